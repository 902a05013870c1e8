"""PiSSA baseline: LoRA whose factors start from the principal singular triplets.

Source: Meng et al., "PiSSA: Principal Singular Values and Singular Vectors
Adaptation of Large Language Models", NeurIPS 2024 (Sec. 3):
``A = diag(sqrt(S_r)) V_r^T``, ``B = U_r diag(sqrt(S_r))``, residual frozen, so the
output equals the base model's at init. PEFT's implementation uses
``torch.svd_lowrank`` for speed (``svd: randomized`` here).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layer import AdapterLayer, Role


class PiSSALayer(AdapterLayer):
    method = "pissa"
    #: best validation rate of bench/quality.py's rotten_tomatoes grid (bench/results/quality_methods_2026-11-25.md)
    default_lr = 1e-3
    roles = {"A": Role.TRAINABLE, "B": Role.TRAINABLE, "A0": Role.INIT, "B0": Role.INIT}
    needs_svd = "top"

    @staticmethod
    def shapes(out_f, in_f, rank, opts):
        return {"A": (rank, in_f), "B": (out_f, rank), "A0": (rank, in_f), "B0": (out_f, rank)}

    @staticmethod
    def init(W, rank, opts, svd_fn, generator):
        f = svd_fn(W, rank)
        root = f.S.sqrt()
        A, B = root.unsqueeze(1) * f.Vh, f.U * root
        return {"A": A, "B": B, "A0": A.clone(), "B0": B.clone()}

    @staticmethod
    def removed(t, opts):
        return t["B0"] @ t["A0"]

    @staticmethod
    def as_low_rank(t, opts):
        """``W - B0 A0 + B A``: a LoRA of rank 2r (PEFT's own PiSSA-to-LoRA conversion identity)."""
        return torch.cat([t["B"], -t["B0"]], 1), torch.cat([t["A"], t["A0"]], 0), None

    @staticmethod
    def merge(W_res, t, opts):
        return W_res + t["B"] @ t["A"]

    def forward(self, x):
        h = self.base_layer(x)
        return h + F.linear(F.linear(x, self.cast(self.A, x)), self.cast(self.B, x)).to(h.dtype)
