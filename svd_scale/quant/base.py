"""The residual-storage interface, and the plain one (the residual stays in the base weight)."""
from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
from torch import nn

from ..layer import from_out_in, math_dtype, to_out_in


class ResidualStorage:
    """How a target's frozen residual ``W_res`` is held. Each engine uses the parts it needs:

    * one process: :meth:`build` gives the base layer holding ``W_res``;
    * ZeRO-3: ``in_place`` storages are written inside a gather; the others are built by the owner
      rank as :meth:`payload` (a picklable object), broadcast, and rebuilt on every rank by
      :meth:`from_payload` before DeepSpeed partitions the new module's ``shard_dtype`` parameters;
    * FSDP2: :meth:`sharded_container` is the module that replaces the base layer *before*
      sharding (None: the base layer itself, whose rows are written in place);
    * merge and export: :meth:`dense` (out x in, fp32) and :meth:`plain` (a plain layer again).
    """

    name: ClassVar[str]
    in_place: ClassVar[bool] = False
    #: whether ``adapter.quant_iters`` applies (refinement against the storage's rounding)
    refines: ClassVar[bool] = False
    default_refine_iters: ClassVar[int] = 1
    #: dtype of the stored parameters, so that a sharder never casts them
    shard_dtype: ClassVar[Optional[torch.dtype]] = None
    quantized: ClassVar[bool] = False

    def __init__(self, double_quant: bool = False):
        self.double_quant = double_quant

    def build(self, base: nn.Module, W_res: torch.Tensor, compute_dtype: torch.dtype) -> nn.Module:
        raise NotImplementedError

    def payload(self, W_res: torch.Tensor) -> Any:
        raise NotImplementedError

    def from_payload(self, base: nn.Module, shape: tuple, payload: Any, compute_dtype: torch.dtype,
                     device: Optional[torch.device] = None) -> nn.Module:
        """The base layer rebuilt around ``payload``, on ``device`` (default: the base weight's; a base built on
        the meta device, whose dense weight was never loaded, names it)."""
        raise NotImplementedError

    def sharded_container(self, base: nn.Module, shape: tuple, compute_dtype: torch.dtype) -> Optional[nn.Module]:
        return None

    def refine(self, W: torch.Tensor, rank: int, iters: int, svd_fn):
        """Factors to keep when the residual is rounded by this storage (default: the plain SVD)."""
        return svd_fn(W, rank)

    @classmethod
    def owns(cls, module: nn.Module) -> bool:
        """Whether ``module`` is a base layer in this storage's form."""
        return False

    @classmethod
    def dense(cls, module: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def plain(cls, module: nn.Module, W: torch.Tensor, dtype: torch.dtype) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def logical_numel(cls, p: torch.Tensor) -> Optional[int]:
        return None


class DenseStorage(ResidualStorage):
    """``quant: none``: the residual overwrites the base weight in place (same shape and dtype),
    which is what lets ZeRO-3 and FSDP2 keep it sharded exactly as before."""

    name = "none"
    in_place = True

    def build(self, base, W_res, compute_dtype):
        with torch.no_grad():
            base.weight.data.copy_(from_out_in(base, W_res).to(base.weight.dtype))
        return base

    @classmethod
    def owns(cls, module):
        return hasattr(module, "weight") and module.weight.dtype.is_floating_point

    @classmethod
    def dense(cls, module):
        return math_dtype(to_out_in(module, module.weight.detach()))

    @classmethod
    def plain(cls, module, W, dtype):
        return cls().build(module, W, dtype)  # the merged weight goes where the residual was
