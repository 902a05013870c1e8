"""The adapter layer every method shares: state roles, dtype contract, shapes.

An adapter layer wraps the original linear module (``base_layer``). The original
weight parameter is *reused* as the frozen residual: initialization overwrites it in
place with ``W - removed`` (same shape, same dtype), which is what lets ZeRO-3 and
FSDP keep it sharded exactly as before -- no new full-size tensor is ever created.
The base layer's own forward (``nn.Linear``, GPT-2's ``Conv1D``, bitsandbytes'
``Linear4bit``) computes ``W_res x + b``; the method adds its low-rank part.

Each method (one file under ``svd_scale/methods/``) subclasses :class:`AdapterLayer`
and declares, in one place, the role of every tensor it adds:

* ``TRAINABLE`` -- fp32 ``nn.Parameter`` with ``requires_grad``; saved in the adapter.
  (float64 in a float64 model, which the exactness tests use.)
* ``FACTOR``    -- frozen parameter used by ``forward`` (e.g. ``U_r``, ``V_r``); saved.
* ``INIT``      -- frozen parameter: the initial values that were subtracted from ``W``
  (e.g. ``sigma0``; ``forward`` may read it). Saved, so that loading an adapter
  rebuilds the residual as ``W - removed(...)`` bit-for-bit, without an SVD. Stored
  in the trainables' dtype: ``sigma0`` must equal the initial ``sigma`` exactly, or
  the init of a bf16 model would be off by bf16's rounding of the top singular values.

Frozen tensors are parameters (not buffers) because ZeRO-3 and FSDP shard
parameters only (under ZeRO-3 small FACTOR/INIT tensors are turned into whole buffers
before the init: ``ZeRO3Access.adopt``). Freezing, saving and tests all derive from ``roles``.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import nn


class Role(str, enum.Enum):
    TRAINABLE = "trainable"
    FACTOR = "factor"
    INIT = "init"


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's GPT-2 ``Conv1D``: a linear layer whose weight is stored in x out."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def logical_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear-like module, without reading its (possibly sharded) data."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if is_conv1d(module):
        return module.nf, module.nx
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def to_out_in(module: nn.Module, W: torch.Tensor) -> torch.Tensor:
    """A module's weight tensor as out x in (GPT-2's Conv1D stores in x out)."""
    return W.t() if is_conv1d(module) else W


def from_out_in(module: nn.Module, W: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_out_in`: an out x in tensor in the module's own layout."""
    return W.t().contiguous() if is_conv1d(module) else W


#: on a base layer: the names of its frozen parameters that an engine keeps as (non-persistent) buffers instead,
#: whole on every rank (ZeRO-3, ``engines/zero3.keep_whole``); still counted, and made parameters again by a merge
WHOLE_ATTR = "svd_scale_kept_as_buffers"


def parameters_back(module: nn.Module) -> nn.Module:
    """Make the buffers an engine kept in place of ``module``'s frozen parameters (:data:`WHOLE_ATTR`) parameters
    again, so a merged layer's weight is in ``state_dict()`` / ``save_pretrained`` like any other."""
    for name in getattr(module, WHOLE_ATTR, ()):
        t = module._buffers.pop(name)
        module._non_persistent_buffers_set.discard(name)
        module.register_parameter(name, t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False))
    if hasattr(module, WHOLE_ATTR):
        delattr(module, WHOLE_ATTR)
    return module


def math_dtype(W: torch.Tensor) -> torch.Tensor:
    """Init and merge math runs in fp32 -- or float64 for a float64 model (the tests' exact reference)."""
    return W if W.dtype == torch.float64 else W.float()


@dataclass(frozen=True)
class Option:
    """A method option, declared in the method's own file and set as ``adapter.<name>`` in a config.

    ``check(value)`` returns an error message (or None); ``None`` as a default means the method
    derives the value (e.g. LoRA's alpha = 2r). ``saved_default``: for an option added after adapters
    were first saved, the value those older files were written with (a file that does not name the
    option is read with it, not with today's default)."""

    default: Any
    help: str
    check: Optional[Callable[[Any], Optional[str]]] = None
    saved_default: Any = None


def non_negative(v) -> Optional[str]:
    return None if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 else "must be a number >= 0"


def one_of(*allowed) -> Callable[[Any], Optional[str]]:
    return lambda v: None if v in allowed else f"must be one of {list(allowed)}"


class TrainingState(nn.Module):
    """Model-level state a method trains but never saves in the adapter (e.g. SaLoRA's
    Lagrange multipliers). Its parameters are trainable; merge removes it."""


class AdapterLayer(nn.Module):
    """Base of every method's layer. Subclasses define the class attributes and the
    four pure pieces: ``shapes``, ``init`` (from the SVD), ``removed`` and ``merge``."""

    method: ClassVar[str]
    roles: ClassVar[dict[str, Role]]
    #: option name -> :class:`Option`; set as ``adapter.<name>`` in a config (validated against the method).
    options: ClassVar[dict[str, Option]] = {}
    #: what the init needs: "top" (top-r SVD), "bottom" (full SVD, smallest r) or "none".
    needs_svd: ClassVar[str] = "top"
    #: the peak learning rate a run gets when ``train.lr`` is not set (each method file says where it comes from)
    default_lr: ClassVar[Optional[float]] = None

    def __init__(self, base_layer: nn.Module, rank: int, opts: dict, factor_dtype: torch.dtype,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.out_features, self.in_features = logical_shape(base_layer)
        self.rank = rank
        self.opts = dict(opts)
        master = torch.float64 if factor_dtype == torch.float64 else torch.float32
        for name, shape in self.shapes(self.out_features, self.in_features, rank, self.opts).items():
            role = self.roles[name]
            dtype = factor_dtype if role is Role.FACTOR else master
            p = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device), requires_grad=role is Role.TRAINABLE)
            self.register_parameter(name, p)

    # ----- what a method defines -------------------------------------------------
    @staticmethod
    def shapes(out_f: int, in_f: int, rank: int, opts: dict) -> dict[str, tuple]:
        raise NotImplementedError

    @staticmethod
    def init(W: torch.Tensor, rank: int, opts: dict, svd_fn, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Initial values of every declared tensor, in fp32, from the full weight ``W`` (out x in).
        ``svd_fn(W, rank)`` returns the top-r :class:`svd_scale.svd.SVD` (for ``needs_svd == "top"``)."""
        raise NotImplementedError

    @staticmethod
    def removed(t: dict[str, torch.Tensor], opts: dict) -> Optional[torch.Tensor]:
        """What is subtracted from ``W`` to form the frozen residual (None: nothing)."""
        raise NotImplementedError

    @staticmethod
    def merge(W_res: torch.Tensor, t: dict[str, torch.Tensor], opts: dict) -> torch.Tensor:
        """The single dense weight (out x in, fp32) equal to this layer's map, minus the bias."""
        raise NotImplementedError

    @classmethod
    def residual(cls, W: torch.Tensor, t: dict[str, torch.Tensor], opts: dict) -> torch.Tensor:
        """The frozen residual ``W - removed(t)`` in ``W``'s math dtype -- the one place it is formed
        (init, loading a saved adapter, every engine), from the tensors *as stored*, so that the
        stored residual plus the stored adapter reproduces ``W`` as closely as storage allows."""
        W = math_dtype(W)
        rem = cls.removed({k: v.to(device=W.device, dtype=W.dtype) for k, v in t.items()}, opts)
        return W if rem is None else W - rem

    # ----- optional hooks: defaults that a method overrides ----------------------
    @classmethod
    def check_options(cls, opts: dict) -> None:
        """Cross-option checks beyond each :class:`Option`'s own (raise ValueError)."""

    def regularizer(self) -> Optional[torch.Tensor]:
        """This layer's term of the method's extra loss (None: no extra loss)."""
        return None

    @classmethod
    def attach(cls, model: nn.Module, layers: list) -> None:
        """Add model-level :class:`TrainingState` after init (SaLoRA's budget multipliers)."""

    @classmethod
    def model_regularizer(cls, model: nn.Module, layers: list) -> Optional[torch.Tensor]:
        """A loss term over all layers at once (SaLoRA's rank budget); None: none."""
        return None

    @classmethod
    def export(cls, t: dict[str, torch.Tensor], opts: dict) -> dict[str, torch.Tensor]:
        """Map a layer's tensors to what the adapter file keeps (SaLoRA prunes closed gates)."""
        return t

    @classmethod
    def as_low_rank(cls, t: dict[str, torch.Tensor], opts: dict) -> Optional[tuple]:
        """The layer's map over the ORIGINAL weight as ``scale * (W + B A)`` (per output row), for exports
        to PEFT: ``(B, A, scale)`` in the tensors' dtype, ``scale`` None when there is none. None: no such
        form (an export then factors the dense change ``merge(residual(W)) - W``, approximately)."""
        return None

    @classmethod
    def has_regularizer(cls) -> bool:
        """Whether the method adds an extra loss (it overrides either regularizer hook)."""
        return (cls.regularizer is not AdapterLayer.regularizer
                or cls.model_regularizer.__func__ is not AdapterLayer.model_regularizer.__func__)

    # ----- shared machinery -------------------------------------------------------
    def tensors(self, roles: tuple = (Role.TRAINABLE, Role.FACTOR, Role.INIT)) -> dict[str, nn.Parameter]:
        return {n: getattr(self, n) for n, r in self.roles.items() if r in roles}

    def fp32_tensors(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Every declared tensor in the math dtype (fp32; float64 in exactness tests)."""
        return {n: p.to(dtype) for n, p in self.tensors().items()}

    def extra_repr(self) -> str:
        return f"method={self.method}, rank={self.rank}, in={self.in_features}, out={self.out_features}"

    @staticmethod
    def cast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The dtype contract: fp32 trainables meet activations in the activation dtype."""
        return t if t.dtype == like.dtype else t.to(like.dtype)
