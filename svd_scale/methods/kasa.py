"""KaSA: knowledge-aware singular-value adaptation.

Source: Wang et al., "KaSA: Knowledge-Aware Singular-Value Adaptation of Large
Language Models", ICLR 2025, code juyongjiang/KaSA.

* Knowledge-aware truncation (Sec. 3.1): remove the r *smallest* singular components
  of W; the rest, ``W_world``, is frozen. This needs the full SVD (never the
  randomized one). Following the PEFT port rather than the official code (which keeps
  ``in - r`` components and so truncates nothing when out < in, e.g. GQA k_proj), we
  keep ``min(out, in) - r`` and require ``r < min(out, in)`` (docs/methods.md).
* Adaptation (Sec. 3.2): ``delta W = (alpha/r) B diag(delta_sigma) A`` with ``A`` (r x in)
  Kaiming-uniform, ``delta_sigma`` ~ N(0, 1), ``B`` (out x r) zeros -- so at init the
  output is the *truncated* weight's, not the base model's.
* Loss (Sec. 3.3): ``beta ||delta_sigma||^2 + gamma (||B^T B - I_r||_F + ||A A^T - I_r||_F)``,
  beta = 1e-4, gamma = 1e-3, with r x r Grams in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import svd as svdlib
from ..layer import AdapterLayer, Option, Role, non_negative
from .lora import ALPHA, kaiming_uniform, resolved_alpha
from .orthogonality import gram_deviation


class KaSALayer(AdapterLayer):
    method = "kasa"
    #: best validation rate of bench/quality.py's rotten_tomatoes grid (bench/results/quality_methods_2026-11-25.md)
    default_lr = 3e-3
    roles = {"A": Role.TRAINABLE, "delta_sigma": Role.TRAINABLE, "B": Role.TRAINABLE,
             "U_min": Role.INIT, "S_min": Role.INIT, "V_min": Role.INIT}
    options = {"alpha": ALPHA,
               "beta": Option(1e-4, "kasa: weight of ||delta_sigma||^2 (Sec. 3.3)", non_negative),
               "gamma": Option(1e-3, "kasa: weight of the orthogonality terms (Sec. 3.3)", non_negative)}
    needs_svd = "bottom"

    @staticmethod
    def shapes(out_f, in_f, rank, opts):
        return {"A": (rank, in_f), "delta_sigma": (rank,), "B": (out_f, rank),
                "U_min": (out_f, rank), "S_min": (rank,), "V_min": (rank, in_f)}

    @staticmethod
    def init(W, rank, opts, svd_fn, generator):
        _, smallest = svdlib.decompose_bottom(W, rank)
        return {"A": kaiming_uniform((rank, W.shape[1]), generator, W.device),
                "delta_sigma": torch.randn(rank, generator=generator, device=W.device),
                "B": torch.zeros(W.shape[0], rank, device=W.device),
                "U_min": smallest.U, "S_min": smallest.S, "V_min": smallest.Vh}

    @staticmethod
    def removed(t, opts):
        return (t["U_min"] * t["S_min"]) @ t["V_min"]

    @staticmethod
    def as_low_rank(t, opts):
        r = t["A"].shape[0]
        B = resolved_alpha(opts, r) / r * t["B"] * t["delta_sigma"]
        return torch.cat([B, -t["U_min"] * t["S_min"]], 1), torch.cat([t["A"], t["V_min"]], 0), None

    @staticmethod
    def merge(W_res, t, opts):
        r = t["A"].shape[0]
        return W_res + resolved_alpha(opts, r) / r * ((t["B"] * t["delta_sigma"]) @ t["A"])

    def regularizer(self):
        o = self.opts
        return (o["beta"] * self.delta_sigma.float().pow(2).sum()
                + o["gamma"] * (gram_deviation(self.B, columns=True) + gram_deviation(self.A, columns=False)))

    def forward(self, x):
        h = self.base_layer(x)
        z = F.linear(x, self.cast(self.A, x)) * self.cast(self.delta_sigma, x)
        d = F.linear(z, self.cast(self.B, x))
        return h + (resolved_alpha(self.opts, self.rank) / self.rank * d).to(h.dtype)
