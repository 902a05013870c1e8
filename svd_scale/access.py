"""How the adapter init reads full weights and writes its results -- and rank helpers.

:class:`WeightAccess` is the interface and the plain case (every weight whole in this process).
The engines add their own, each in its own file (``engines/zero3.py``: ZeRO-3 partitions;
``engines/fsdp2.py``: FSDP2 DTensors), with :func:`register_access`. :func:`access_for` picks the
one that fits a model by looking at its parameters, so ``svd_scale.apply(model, cfg)`` works on a
model built under ``deepspeed.zero.Init`` or ``fully_shard`` without being told. Whole values of
sharded tensors (for export) are read through the same registry (:func:`full_value`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .layer import AdapterLayer, math_dtype, to_out_in

#: ``compute(index, name, layer, W)`` -> the layer's tensors (fp32), from its full weight ``W`` (out x in)
Compute = Callable[[int, str, AdapterLayer, torch.Tensor], dict]


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def load_tensors(layer: AdapterLayer, tensors: dict[str, torch.Tensor]) -> None:
    """Copy init values into the layer's parameters (casting to their storage dtype)."""
    own = layer.tensors()
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise KeyError(f"{layer.method}: missing tensors {missing}")
    for n, p in own.items():
        t = tensors[n]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{layer.method}.{n}: expected shape {tuple(p.shape)}, got {tuple(t.shape)}")
        p.data.copy_(t.to(device=p.device, dtype=p.dtype))


def stored_residual(layer: AdapterLayer, W: torch.Tensor) -> torch.Tensor:
    """``W - removed`` from the layer's tensors as stored (so that the split is exact)."""
    return type(layer).residual(W, layer.fp32_tensors(math_dtype(W).dtype), layer.opts)


class WeightAccess:
    """Weights that live whole in this process: read, compute, write, one layer at a time."""

    @classmethod
    def detect(cls, model: nn.Module) -> bool:
        """Whether this access fits ``model`` (the plain one fits any model: it is the fallback)."""
        return True

    @classmethod
    def holds(cls, p: torch.Tensor) -> bool:
        """Whether ``p`` is a tensor of this access's kind (for :func:`full_value`)."""
        return True

    @staticmethod
    def full_value(p: torch.Tensor) -> torch.Tensor:
        return p.detach().cpu()

    @staticmethod
    def set_full_value(p: torch.Tensor, full: torch.Tensor) -> None:
        with torch.no_grad():
            p.data.copy_(full.to(device=p.device, dtype=p.dtype))

    def check(self, model: nn.Module, cfg) -> None:
        """Refuse, before anything changes, a configuration this access cannot build."""

    def adopt(self, model: nn.Module, layers: list[tuple[str, AdapterLayer]]) -> None:
        """Make freshly wrapped layers' new parameters part of the model's sharding (if any)."""

    def wire_regularizer(self, model: nn.Module, regularizer: nn.Module) -> None:
        """Let the method's extra loss read whole parameters (nothing to do when they are whole)."""

    def run(self, layers: list[tuple[str, AdapterLayer]], compute: Compute) -> None:
        for i, (name, layer) in enumerate(layers):
            with torch.no_grad():
                W = math_dtype(to_out_in(layer.base_layer, layer.base_layer.weight.detach()))
                load_tensors(layer, compute(i, name, layer, W))
                layer.base_layer = layer.storage.build(layer.base_layer, stored_residual(layer, W), layer.compute_dtype)


_ACCESSES: list[type[WeightAccess]] = []


def register_access(cls: type[WeightAccess]) -> type[WeightAccess]:
    """Add a sharded engine's access; :func:`access_for` tries the registered ones first."""
    if cls not in _ACCESSES:
        _ACCESSES.append(cls)
    return cls


def access_for(model: nn.Module) -> WeightAccess:
    """The access that fits how ``model``'s weights are stored."""
    for cls in _ACCESSES:
        if cls.detect(model):
            return cls()
    return WeightAccess()


def _kind(p: torch.Tensor) -> type[WeightAccess]:
    return next((cls for cls in _ACCESSES if cls.holds(p)), WeightAccess)


def full_value(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU, in the dtype training keeps it. A collective for sharded tensors:
    every rank must call it."""
    return _kind(p).full_value(p)


def set_full_value(p: torch.Tensor, full: torch.Tensor) -> None:
    """Write the whole value ``full`` (held by every rank) into ``p``: its own rows if sharded."""
    _kind(p).set_full_value(p, full)
