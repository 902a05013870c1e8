"""4-bit NF4 storage of the frozen residual (``adapter.quant: nf4``) -- the only module that touches bitsandbytes.

The SVD is always taken on the full-precision weight; only the residual
``W - removed`` is quantized (PEFT refuses SVD inits on quantized weights and sends
users to an offline step; here it is the normal path). bitsandbytes does the NF4
work: ``quantize_4bit(quant_type="nf4", blocksize=64)`` with
``quant_storage=torch.bfloat16``, so the packed data is an ordinary bf16 tensor that
ZeRO-3 and FSDP can flatten and shard (4 codes per element).

The quantized residual lives in a ``bnb.nn.Linear4bit`` that replaces the adapter
layer's ``base_layer`` at init time; the adapter's forward is unchanged
(``base_layer(x)`` is ``W_res x + b`` either way).

Optional refinement (QPiSSA; Meng et al., PiSSA, NeurIPS 2024, Sec. 4.3): start from
``E = W``; repeat T times: take the top-r factors of ``E``, quantize
``W - U S V^T``, set ``E = W - dequant(Q)``; keep the factors whose total error
``||W - dequant(Q) - U S V^T||`` is smallest.
"""
from __future__ import annotations

import torch
from torch import nn

from typing import Optional

from ..layer import is_conv1d
from .base import ResidualStorage

BLOCKSIZE = 64


def quantize_nf4(W: torch.Tensor, double_quant: bool = False):
    """``(packed bf16-storage tensor, QuantState)`` of ``W`` (out x in)."""
    import bitsandbytes.functional as bnbF

    return bnbF.quantize_4bit(W.contiguous(), blocksize=BLOCKSIZE, compress_statistics=double_quant,
                              quant_type="nf4", quant_storage=torch.bfloat16)


def dequantize_nf4(packed: torch.Tensor, state) -> torch.Tensor:
    import bitsandbytes.functional as bnbF

    return bnbF.dequantize_4bit(packed, state)


def nf4_roundtrip(W: torch.Tensor, double_quant: bool = False) -> torch.Tensor:
    """``dequant(NF4(W))`` in fp32: what a 4-bit store of ``W`` gives back."""
    q, s = quantize_nf4(W.float(), double_quant)
    return dequantize_nf4(q, s).float()


def refine_factors(W: torch.Tensor, rank: int, iters: int, svd_fn, double_quant: bool = False):
    """QPiSSA-style alternation (module docstring); returns (factors, relative error)."""
    W = W.float()
    E, best, best_err = W, None, None
    norm = torch.linalg.norm(W)
    for _ in range(max(1, iters)):
        f = svd_fn(E, rank)
        R = W - f.product()
        Q = nf4_roundtrip(R, double_quant)
        err = torch.linalg.norm(R - Q) / norm
        if best_err is None or err < best_err:
            best, best_err = f, err
        E = W - Q
    return best, float(best_err)


def is_4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit"


def linear4bit_from(base: nn.Module, W_res: torch.Tensor, compute_dtype: torch.dtype, double_quant: bool) -> nn.Module:
    """A frozen ``bnb.nn.Linear4bit`` holding NF4(W_res) and ``base``'s bias."""
    packed, state = quantize_nf4(W_res.float(), double_quant)
    bias = getattr(base, "bias", None)
    if bias is not None:
        bias = nn.Parameter(bias.detach().to(compute_dtype).clone(), requires_grad=False)
    return linear4bit_from_packed(base, tuple(W_res.shape), packed, state, compute_dtype, double_quant, bias)


def linear4bit_from_packed(base: nn.Module, shape: tuple, packed: torch.Tensor, state, compute_dtype: torch.dtype,
                           double_quant: bool, bias: "nn.Parameter | None") -> nn.Module:
    """A frozen ``bnb.nn.Linear4bit`` around already-quantized data (``shape`` = out x in)."""
    import bitsandbytes as bnb

    out_f, in_f = shape
    # The residual is quantized from fp32, so bitsandbytes records fp32 as the dequantized
    # dtype; every forward/backward would then dequantize to fp32 and cast. Dequantizing
    # straight to the compute dtype rounds the same fp32 products once and halves that traffic.
    state.dtype = compute_dtype
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=compute_dtype, compress_statistics=double_quant,
                            quant_type="nf4", quant_storage=torch.bfloat16, device=packed.device)
    lin.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=BLOCKSIZE,
                                   compress_statistics=double_quant, quant_type="nf4",
                                   quant_storage=torch.bfloat16, module=lin, bnb_quantized=True)
    lin.bias = bias
    # bitsandbytes >= 0.49 repacks the codes, in place, into a uint8 layout of another shape on the
    # first no-grad forward on a CPU with AVX512-BF16. That breaks the bf16 storage that ZeRO-3/FSDP
    # shard, and dequantize_4bit (merge, export) then reads garbage: keep the portable layout.
    lin.support_avx512bf16_for_cpu = False
    lin.svd_scale_was_conv1d = is_conv1d(base)  # merge gives GPT-2 its Conv1D back
    return lin


class ShardableNF4Linear(nn.Module):
    """An NF4 weight stored as plain parameters that FSDP2 shards like any other.

    ``bnb.nn.Linear4bit`` keeps its QuantState on the ``Params4bit`` object, which FSDP2 replaces by
    a plain tensor when it swaps in the unsharded parameter, so the 4-bit layer breaks (accelerate's
    FSDP2 path therefore leaves 4-bit weights unsharded). Here every per-weight tensor of the
    QuantState is a bf16 parameter (so a bf16 ``MixedPrecisionPolicy`` cast is a no-op on its bits):
    the packed codes (4 codes per element), and the block scales ``absmax`` -- fp32 viewed as bf16
    pairs, or with ``double_quant`` their 8-bit codes viewed as bf16 pairs plus ``absmax2``, the fp32
    scales of those codes (one per 256 blocks). The rest is constant per weight and tiny: the NF4 and
    8-bit code tables and double quantization's ``offset`` (buffers, the same on every rank). The
    QuantState is rebuilt around the gathered tensors in ``forward``; bitsandbytes does the matmul.
    """

    #: the parameters the adapter init writes (the bias is read from the base checkpoint as usual)
    filled_at_init = ("weight", "absmax", "absmax2")

    def __init__(self, out_f: int, in_f: int, compute_dtype: torch.dtype, bias: "nn.Parameter | None" = None,
                 device=None, double_quant: bool = False):
        import bitsandbytes.functional as bnbF

        super().__init__()
        n = out_f * in_f
        self.out_features, self.in_features, self.compute_dtype = out_f, in_f, compute_dtype
        self.double_quant, self.n_blocks = double_quant, -(-n // BLOCKSIZE)
        self.weight = nn.Parameter(torch.empty(n // 4, 1, dtype=torch.bfloat16, device=device), requires_grad=False)
        for name, shape in self._scale_shapes().items():
            setattr(self, name, nn.Parameter(torch.empty(shape, dtype=torch.bfloat16, device=device), requires_grad=False))
        with torch.device("cpu"):  # real even when the layer is built under a meta-device context (load_sharded)
            self.register_buffer("code", bnbF.get_4bit_type("nf4", device="cpu"), persistent=False)
            if double_quant:
                self.register_buffer("code2", bnbF.create_dynamic_map(signed=True), persistent=False)
                self.register_buffer("offset", torch.zeros(()), persistent=False)
        self.bias = bias

    def _scale_shapes(self) -> dict[str, tuple]:
        if not self.double_quant:
            return {"absmax": (2 * self.n_blocks,)}  # fp32 as bf16 pairs
        return {"absmax": (-(-self.n_blocks // 2),),  # uint8 codes as bf16 pairs (one pad byte if odd)
                "absmax2": (2 * -(-self.n_blocks // 256),)}  # fp32 as bf16 pairs

    def payload(self, W_res: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every per-weight tensor of NF4(W_res), full size, by attribute name (the owner's part
        of the init; the others receive them by broadcast)."""
        packed, state = quantize_nf4(W_res.float(), double_quant=self.double_quant)
        out = {"weight": packed.reshape(-1, 1)}
        if not self.double_quant:
            out["absmax"] = state.absmax.float().contiguous().view(torch.bfloat16)
            return out
        codes = torch.zeros(2 * self._scale_shapes()["absmax"][0], dtype=torch.uint8, device=packed.device)
        codes[: self.n_blocks] = state.absmax
        out["absmax"] = codes.view(torch.bfloat16)
        out["absmax2"] = state.state2.absmax.float().contiguous().view(torch.bfloat16)
        out["offset"] = torch.as_tensor(state.offset, dtype=torch.float32, device=packed.device).reshape(())
        return out

    def empty_payload(self, device) -> dict[str, torch.Tensor]:
        """Receive buffers shaped like :meth:`payload`'s tensors."""
        out = {"weight": torch.empty(self.weight.shape, dtype=torch.bfloat16, device=device)}
        out.update({k: torch.empty(v, dtype=torch.bfloat16, device=device) for k, v in self._scale_shapes().items()})
        if self.double_quant:
            out["offset"] = torch.empty((), dtype=torch.float32, device=device)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbF

        shape = torch.Size((self.out_features, self.in_features))
        if self.double_quant:
            state2 = bnbF.QuantState(absmax=self.absmax2.view(torch.float32), code=self.code2.to(x.device),
                                     blocksize=256, dtype=torch.float32)
            state = bnbF.QuantState(absmax=self.absmax.view(torch.uint8)[: self.n_blocks], shape=shape,
                                    code=self.code.to(x.device), blocksize=BLOCKSIZE, quant_type="nf4",
                                    dtype=self.compute_dtype, offset=self.offset.to(x.device), state2=state2)
        else:
            state = bnbF.QuantState(absmax=self.absmax.view(torch.float32), shape=shape, code=self.code.to(x.device),
                                    blocksize=BLOCKSIZE, quant_type="nf4", dtype=self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return bnb.matmul_4bit(x, self.weight.t(), bias=bias, quant_state=state)


def state_to_payload(packed: torch.Tensor, state) -> dict:
    """Everything a 4-bit weight is, as plain tensors (for broadcasting from its owner rank)."""
    return {"packed": packed.cpu(), "state": {k: v.cpu() if torch.is_tensor(v) else v
                                              for k, v in state.as_dict(packed=True).items()}}


def payload_to_state(payload: dict, device):
    import bitsandbytes.functional as bnbF

    return payload["packed"].to(device), bnbF.QuantState.from_dict(payload["state"], device=device)


def dense_from_4bit(module: nn.Module) -> torch.Tensor:
    """fp32 out x in weight of a Linear4bit."""
    return dequantize_nf4(module.weight.data, module.weight.quant_state).float()


def plain_linear(module: nn.Module, W: torch.Tensor, dtype: torch.dtype) -> nn.Module:
    """The plain transformers layer for a merged 4-bit layer: ``nn.Linear`` (or GPT-2's
    ``Conv1D``) in ``dtype`` with weight ``W`` (out x in) and the 4-bit layer's bias."""
    out_f, in_f = W.shape
    bias = module.bias
    if getattr(module, "svd_scale_was_conv1d", False):
        from transformers.pytorch_utils import Conv1D

        new = Conv1D(out_f, in_f).to(dtype)
        new.weight.data.copy_(W.t())
    else:
        new = nn.Linear(in_f, out_f, bias=bias is not None, dtype=dtype, device=W.device)
        new.weight.data.copy_(W)
    if bias is not None:
        new.bias.data.copy_(bias.detach())
    new.requires_grad_(False)
    return new


class NF4Storage(ResidualStorage):
    """``quant: nf4``: the residual in 4-bit NF4, quantized once from fp32 after the SVD."""

    name = "nf4"
    refines = True
    #: T=5 beat T=1 at every rank on real SmolLM2 and random 7B-shaped weights (bench/quant_error.py)
    default_refine_iters = 5
    shard_dtype = torch.bfloat16
    quantized = True

    def build(self, base, W_res, compute_dtype):
        return linear4bit_from(base, W_res, compute_dtype, self.double_quant)

    def payload(self, W_res):
        packed, state = quantize_nf4(W_res.float(), self.double_quant)
        return state_to_payload(packed, state)

    def from_payload(self, base, shape, payload, compute_dtype, device=None):
        packed, state = payload_to_state(payload, device if device is not None else base.weight.device)
        return linear4bit_from_packed(base, shape, packed, state, compute_dtype, self.double_quant,
                                      getattr(base, "bias", None))

    def sharded_container(self, base, shape, compute_dtype):
        with torch.device("meta"):
            lin = ShardableNF4Linear(shape[0], shape[1], compute_dtype, bias=getattr(base, "bias", None),
                                     double_quant=self.double_quant)
        lin.svd_scale_was_conv1d = is_conv1d(base)
        return lin

    def refine(self, W, rank, iters, svd_fn):
        return refine_factors(W, rank, iters, svd_fn, self.double_quant)[0]

    @classmethod
    def owns(cls, module):
        return is_4bit(module) or isinstance(module, ShardableNF4Linear)

    @classmethod
    def dense(cls, module):
        return dense_from_4bit(module)

    @classmethod
    def plain(cls, module, W, dtype):
        return plain_linear(module, W, dtype)

    @classmethod
    def logical_numel(cls, p) -> Optional[int]:
        state = getattr(p, "quant_state", None)
        return int(state.shape.numel()) if state is not None else None
