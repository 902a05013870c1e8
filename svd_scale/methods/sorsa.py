"""SORSA: singular values and orthonormal-regularized singular vectors.

Source: Cao & Song, "SORSA: Singular Values and Orthonormal Regularized Singular
Vectors Adaptation of Large Language Models", arXiv 2409.00055, code
Gunale0926/SORSA. The top-r triplets of W become trainable (``U_p``, ``S_p``, ``V_p``,
fp32); the residual is frozen (Sec. 3.1). The regularizer (Sec. 3.2) keeps the
singular vectors orthonormal:

    L_reg = gamma * (||U_p^T U_p - I_r||_F + ||V_p V_p^T - I_r||_F),  gamma = 4e-4,

averaged over layers (``svd_scale.losses``). The paper applies it as a separate
update and the official code adds ``(gamma/lr_peak) * grad L_reg`` after clipping;
following docs/methods.md we add ``gamma * L_reg`` to the loss, which works with any
engine (Trainer, DeepSpeed, FSDP) -- a documented difference in scale of the step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layer import AdapterLayer, Option, Role, non_negative
from .orthogonality import gram_deviation


class SORSALayer(AdapterLayer):
    method = "sorsa"
    #: best validation rate of bench/quality.py's rotten_tomatoes grid (bench/results/quality_methods_2026-11-25.md)
    default_lr = 1e-4
    roles = {"U_p": Role.TRAINABLE, "S_p": Role.TRAINABLE, "V_p": Role.TRAINABLE,
             "U0": Role.INIT, "S0": Role.INIT, "V0": Role.INIT}
    options = {"gamma": Option(4e-4, "sorsa: weight of the orthonormality regularizer (Sec. 3.2)", non_negative)}
    needs_svd = "top"

    @staticmethod
    def shapes(out_f, in_f, rank, opts):
        return {"U_p": (out_f, rank), "S_p": (rank,), "V_p": (rank, in_f), "U0": (out_f, rank), "S0": (rank,), "V0": (rank, in_f)}

    @staticmethod
    def init(W, rank, opts, svd_fn, generator):
        f = svd_fn(W, rank)
        return {"U_p": f.U, "S_p": f.S, "V_p": f.Vh, "U0": f.U.clone(), "S0": f.S.clone(), "V0": f.Vh.clone()}

    @staticmethod
    def removed(t, opts):
        return (t["U0"] * t["S0"]) @ t["V0"]

    @staticmethod
    def as_low_rank(t, opts):
        return torch.cat([t["U_p"] * t["S_p"], -t["U0"] * t["S0"]], 1), torch.cat([t["V_p"], t["V0"]], 0), None

    @staticmethod
    def merge(W_res, t, opts):
        return W_res + (t["U_p"] * t["S_p"]) @ t["V_p"]

    def regularizer(self):
        return self.opts["gamma"] * (gram_deviation(self.U_p, columns=True) + gram_deviation(self.V_p, columns=False))

    def forward(self, x):
        h = self.base_layer(x)
        z = F.linear(x, self.cast(self.V_p, x)) * self.cast(self.S_p, x)
        return h + F.linear(z, self.cast(self.U_p, x)).to(h.dtype)
