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


def register_method(cls: type[AdapterLayer]) -> type[AdapterLayer]:
    """Make ``cls`` available as ``adapter.method: <cls.method>``, with its declared options."""
    METHODS[cls.method] = cls
    return cls


for _cls in (SVDScaleLayer, SVFitLayer, SORSALayer, KaSALayer, SaLoRALayer, PiSSALayer, LoRALayer):
    register_method(_cls)


def get_method(name: str) -> type[AdapterLayer]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown adapter method {name!r}; available: {sorted(METHODS)}") from None


def option_users() -> dict[str, list[str]]:
    """Every method option name -> the methods that declare it."""
    users: dict[str, list[str]] = {}
    for m, cls in sorted(METHODS.items()):
        for name in cls.options:
            users.setdefault(name, []).append(m)
    return users


def option_help() -> dict[str, str]:
    """Every method option name -> its help texts (each distinct one once, in method order)."""
    out: dict[str, list[str]] = {}
    for _, cls in sorted(METHODS.items()):
        for name, opt in cls.options.items():
            if opt.help not in out.setdefault(name, []):
                out[name].append(opt.help)
    return {name: " | ".join(helps) for name, helps in out.items()}


def resolve_options(method: str, options: dict) -> dict:
    """The method's options: its declared defaults, overridden by the non-None values given."""
    cls = get_method(method)
    return {k: (options[k] if options.get(k) is not None else o.default) for k, o in cls.options.items()}


def validate_options(method: str, options: dict) -> None:
    """Reject an option the method does not declare (naming the methods that do) or a bad value."""
    cls = get_method(method)
    users = option_users()
    for name, value in options.items():
        if name not in cls.options:
            if name in users:
                raise ValueError(f"adapter.{name} is not used by method {method!r} (used by: {users[name]})")
            raise ValueError(f"unknown adapter option {name!r}; options of {method!r}: {sorted(cls.options)}")
        problem = cls.options[name].check(value) if cls.options[name].check and value is not None else None
        if problem:
            raise ValueError(f"adapter.{name} {problem} for {method}, got {value!r}")
    cls.check_options(resolve_options(method, options))
