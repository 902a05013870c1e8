"""Engines: one module per way of running a job, behind the small :class:`Engine` interface.

* ``single`` -- one process, weights whole (``engines/single.py``);
* ``deepspeed`` -- DeepSpeed ZeRO-3 (``engines/zero3.py``);
* ``fsdp2`` -- PyTorch FSDP2 under ``torchrun`` (``engines/fsdp2.py``).

Each engine module also registers its weight access with ``svd_scale.access`` on import, which is
how ``svd_scale.apply`` recognises a sharded model by itself. Adding an engine is one module here
and a ``register_engine`` line (docs/extending.md). Importing this package imports neither
deepspeed nor bitsandbytes.
"""
from __future__ import annotations

from .base import Engine
from .fsdp2 import FSDP2Engine
from .single import SingleEngine
from .zero3 import ZeRO3Engine

ENGINES: dict[str, type[Engine]] = {}


def register_engine(cls: type[Engine]) -> type[Engine]:
    """Make ``cls`` available as ``train.engine: <cls.name>``."""
    from ..config import ENGINES as NAMES

    ENGINES[cls.name] = cls
    if cls.name not in NAMES:
        NAMES.append(cls.name)
    return cls


for _cls in (SingleEngine, ZeRO3Engine, FSDP2Engine):
    register_engine(_cls)


def create(cfg) -> Engine:
    """The engine ``cfg.train`` asks for (``auto``: deepspeed if a DeepSpeed config is given)."""
    return ENGINES[cfg.train.resolved_engine()](cfg)


__all__ = ["Engine", "ENGINES", "create", "register_engine", "SingleEngine", "ZeRO3Engine", "FSDP2Engine"]
