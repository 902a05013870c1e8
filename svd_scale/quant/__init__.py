"""How the frozen residual is stored: one strategy per storage type, looked up by ``adapter.quant``.

``none`` keeps the residual in the base weight itself (:class:`DenseStorage`); ``nf4`` stores it in
4-bit NF4 through bitsandbytes (:mod:`svd_scale.quant.nf4`). Adding a type is one file with a
:class:`ResidualStorage` subclass and a ``register_storage`` line; nothing else in the package
tests storage names or layer classes. Importing this package never imports bitsandbytes.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import DenseStorage, ResidualStorage
from .nf4 import NF4Storage

STORAGES: dict[str, type[ResidualStorage]] = {}


def register_storage(cls: type[ResidualStorage]) -> type[ResidualStorage]:
    STORAGES[cls.name] = cls
    return cls


for _cls in (DenseStorage, NF4Storage):
    register_storage(_cls)


def storage_names() -> tuple:
    return tuple(STORAGES)


def get_storage(name: str, **opts) -> ResidualStorage:
    try:
        return STORAGES[name](**opts)
    except KeyError:
        raise ValueError(f"adapter.quant must be one of {list(STORAGES)}, got {name!r}") from None


def storage_of(module: nn.Module) -> type[ResidualStorage]:
    """The storage type of a base layer (the quantized ones first; plain layers are dense)."""
    for cls in STORAGES.values():
        if cls is not DenseStorage and cls.owns(module):
            return cls
    return DenseStorage


def logical_numel(p: torch.Tensor) -> int:
    """Elements a parameter stands for (a packed 4-bit weight counts its logical elements, as
    PEFT and bitsandbytes report); sharded parameters count at full size."""
    for cls in STORAGES.values():
        n = cls.logical_numel(p)
        if n is not None:
            return n
    return int(getattr(p, "ds_numel", 0) or p.numel())


__all__ = ["ResidualStorage", "DenseStorage", "NF4Storage", "register_storage", "get_storage", "storage_names",
           "storage_of", "logical_numel"]
