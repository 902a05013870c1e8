"""LoRA baseline on the same machinery (for ablations on identical code paths).

Source: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022
(Sec. 4.1): ``W`` frozen, ``delta W = (alpha/r) B A``, ``A`` Kaiming-uniform (as PEFT),
``B`` zeros, so the output equals the base model's at init. Comparisons against the
real PEFT library live in ``bench/``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..layer import AdapterLayer, Option, Role


def kaiming_uniform(shape: tuple, generator: torch.Generator, device) -> torch.Tensor:
    """PEFT/nn.Linear's default: kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    t = torch.empty(shape, dtype=torch.float32, device=device)
    torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
    return t


def positive_or_none(v):
    ok = v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0)
    return None if ok else "must be a positive number (or null for the default 2r)"


ALPHA = Option(None, "lora/kasa/salora: scaling numerator, the delta is scaled by alpha/r (null: 2r)", positive_or_none)


def resolved_alpha(opts: dict, rank: int) -> float:
    return float(opts["alpha"]) if opts.get("alpha") is not None else 2.0 * rank


class LoRALayer(AdapterLayer):
    method = "lora"
    #: PEFT LoRA r=16's grid on rotten_tomatoes (bench/results/quality_methods_2026-11-25.md): 1e-3, not the edge 3e-3 whose two seeds were 80.0 / 67.2
    default_lr = 1e-3
    roles = {"A": Role.TRAINABLE, "B": Role.TRAINABLE}
    options = {"alpha": ALPHA}
    needs_svd = "none"

    @staticmethod
    def shapes(out_f, in_f, rank, opts):
        return {"A": (rank, in_f), "B": (out_f, rank)}

    @staticmethod
    def init(W, rank, opts, svd_fn, generator):
        return {"A": kaiming_uniform((rank, W.shape[1]), generator, W.device),
                "B": torch.zeros(W.shape[0], rank, device=W.device)}

    @staticmethod
    def removed(t, opts):
        return None

    @staticmethod
    def as_low_rank(t, opts):
        return resolved_alpha(opts, t["A"].shape[0]) / t["A"].shape[0] * t["B"], t["A"], None

    @staticmethod
    def merge(W_res, t, opts):
        return W_res + resolved_alpha(opts, t["A"].shape[0]) / t["A"].shape[0] * (t["B"] @ t["A"])

    def forward(self, x):
        h = self.base_layer(x)
        d = F.linear(F.linear(x, self.cast(self.A, x)), self.cast(self.B, x))
        return h + (resolved_alpha(self.opts, self.rank) / self.rank * d).to(h.dtype)
