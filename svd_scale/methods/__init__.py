"""Method registry: name -> layer class. One file per method; see each file's docstring.

``register_method`` keeps the registry open: a user's own method (an
:class:`~svd_scale.layer.AdapterLayer` subclass) plugs into the same injection,
saving, merging and distributed init as the built-in ones.
"""
from __future__ import annotations

from ..layer import AdapterLayer
from .kasa import KaSALayer
from .lora import LoRALayer
from .pissa import PiSSALayer
from .salora import SaLoRALayer
from .sorsa import SORSALayer
from .svd_scale import SVDScaleLayer
from .svfit import SVFitLayer

METHODS: dict[str, type[AdapterLayer]] = {}
OPTION_FIELDS = ("scale", "alpha", "gamma", "beta", "budget")


def register_method(cls: type[AdapterLayer]) -> type[AdapterLayer]:
    METHODS[cls.method] = cls
    return cls


for _cls in (SVDScaleLayer, SVFitLayer, SORSALayer, KaSALayer, SaLoRALayer, PiSSALayer, LoRALayer):
    register_method(_cls)


def get_method(name: str) -> type[AdapterLayer]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown adapter method {name!r}; available: {sorted(METHODS)}") from None


def resolve_options(cfg) -> dict:
    """The method's options with the config's non-None values filled in."""
    cls = get_method(cfg.method)
    return {k: (getattr(cfg, k) if getattr(cfg, k) is not None else d) for k, d in cls.options.items()}


def validate_options(cfg) -> None:
    cls = get_method(cfg.method)
    for name in OPTION_FIELDS:
        if getattr(cfg, name) is not None and name not in cls.options:
            users = sorted(m for m, c in METHODS.items() if name in c.options)
            raise ValueError(f"adapter.{name} is not used by method {cfg.method!r} (used by: {users})")
    check = getattr(cls, "check_options", None)
    if check is not None:
        check(resolve_options(cfg))
