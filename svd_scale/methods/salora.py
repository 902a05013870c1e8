"""SaLoRA: structure-aware LoRA with L0 (hard-concrete) gates and a rank budget.

Source: Hu et al., "Structure-Aware Low-Rank Adaptation for Parameter-Efficient
Fine-Tuning", Mathematics 11(20):4317, 2023 (no official code; docs/methods.md gives the
details). ``delta W = (alpha/r) B diag(g) A``, W frozen, LoRA init (so the output
equals the base model's at init).

* Gates (Sec. 3.2, after Louizos et al. 2018): in training
  ``g = clamp(sigmoid((log u - log(1-u) + log_alpha)/beta) (zeta-gamma) + gamma, 0, 1)``,
  ``u ~ U(0,1)``; at eval ``g = clamp(sigmoid(log_alpha)(zeta-gamma)+gamma, 0, 1)``;
  beta = 2/3, gamma = -0.1, zeta = 1.1. ``log_alpha`` starts at 3 (every gate open).
* Budget (Sec. 3.3): ``L + l1 (E[L0] - T) + l2 (E[L0] - T)^2`` with
  ``E[L0] = sum sigmoid(log_alpha - beta log(-gamma/zeta))`` over all layers, and
  l1, l2 trained by gradient *ascent* (a gradient-reversal in the graph, so it works
  under any optimizer or engine). The target T falls linearly from the initial total
  rank to ``budget`` x that over the first 2/3 of training (``set_progress``, called
  by the Trainer callback; a user's own loop calls it too), then stays.
* Orthogonality: ``||A A^T - I||_F^2 + ||B^T B - I||_F^2`` (weight ``gamma``, default 1e-3).
* Export drops every component whose eval gate is exactly 0: the saved tensors
  physically shrink and each layer keeps only its surviving rank.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..layer import AdapterLayer, Option, Role, TrainingState, non_negative
from .lora import ALPHA, kaiming_uniform, resolved_alpha
from .orthogonality import gram_deviation

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
LOG_ALPHA_INIT = 3.0
RAMP_FRACTION = 2.0 / 3.0


def eval_gates(log_alpha: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def sample_gates(log_alpha: torch.Tensor) -> torch.Tensor:
    u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def expected_l0(log_alpha: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(log_alpha.float() - BETA * math.log(-GAMMA / ZETA)).sum()


def _scaling(opts: dict) -> float:
    r = opts["config_rank"]
    return resolved_alpha(opts, r) / r


class _Ascent(torch.autograd.Function):
    """Identity forward, negated gradient: the optimizer's descent becomes ascent."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -g


class SaLoRABudget(TrainingState):
    """Model-level training state of SaLoRA: the Lagrange multipliers and the schedule.
    Not part of the adapter file (it only steers training)."""

    def __init__(self, initial_total: int, budget: float):
        super().__init__()
        self.lambdas = nn.Parameter(torch.zeros(2))
        self.initial_total = float(initial_total)
        self.final_total = float(budget) * initial_total
        self.register_buffer("progress", torch.zeros(()), persistent=False)

    def target(self) -> float:
        f = min(1.0, float(self.progress) / RAMP_FRACTION)
        return self.initial_total + (self.final_total - self.initial_total) * f

    def loss(self, l0: torch.Tensor) -> torch.Tensor:
        gap = l0 - self.target()
        lam = _Ascent.apply(self.lambdas.float())
        return lam[0] * gap + lam[1] * gap * gap


class SaLoRALayer(AdapterLayer):
    method = "salora"
    #: best validation rate of bench/quality.py's rotten_tomatoes grid (bench/results/quality_methods_2026-11-25.md)
    default_lr = 1e-4
    roles = {"A": Role.TRAINABLE, "B": Role.TRAINABLE, "log_alpha": Role.TRAINABLE}
    options = {"alpha": ALPHA,
               "gamma": Option(1e-3, "salora: weight of the orthogonality terms", non_negative),
               "budget": Option(0.5, "salora: target fraction of rank components kept, in (0, 1] (Sec. 3.3)",
                                lambda v: None if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1
                                else "must be in (0, 1]")}
    needs_svd = "none"

    @staticmethod
    def shapes(out_f, in_f, rank, opts):
        return {"A": (rank, in_f), "B": (out_f, rank), "log_alpha": (rank,)}

    @staticmethod
    def init(W, rank, opts, svd_fn, generator):
        return {"A": kaiming_uniform((rank, W.shape[1]), generator, W.device),
                "B": torch.zeros(W.shape[0], rank, device=W.device),
                "log_alpha": torch.full((rank,), LOG_ALPHA_INIT, device=W.device)}

    @staticmethod
    def removed(t, opts):
        return None

    @staticmethod
    def merge(W_res, t, opts):
        return W_res + _scaling(opts) * ((t["B"] * eval_gates(t["log_alpha"])) @ t["A"])

    @staticmethod
    def as_low_rank(t, opts):
        return _scaling(opts) * t["B"] * eval_gates(t["log_alpha"]), t["A"], None

    @classmethod
    def export(cls, t: dict, opts: dict) -> dict:
        """Drop the components whose eval gate is 0 (pure; the output does not change:
        the scaling alpha/r uses the configured r, ``opts["config_rank"]``, not the survivors)."""
        keep = eval_gates(t["log_alpha"]) > 0
        return {"A": t["A"][keep], "B": t["B"][:, keep], "log_alpha": t["log_alpha"][keep]}

    def regularizer(self):
        return self.opts["gamma"] * (gram_deviation(self.A, columns=False, squared=True)
                                     + gram_deviation(self.B, columns=True, squared=True))

    def forward(self, x):
        h = self.base_layer(x)
        g = sample_gates(self.log_alpha) if self.training else eval_gates(self.log_alpha)
        z = F.linear(x, self.cast(self.A, x)) * self.cast(g, x)
        return h + (_scaling(self.opts) * F.linear(z, self.cast(self.B, x))).to(h.dtype)

    # ----- model-level pieces ------------------------------------------------------
    @classmethod
    def attach(cls, model: nn.Module, layers: list) -> None:
        opts = layers[0][1].opts
        model.salora_budget = SaLoRABudget(sum(l.rank for _, l in layers), opts["budget"])

    @classmethod
    def model_regularizer(cls, model: nn.Module, layers: list) -> Optional[torch.Tensor]:
        budget = getattr(model, "salora_budget", None)
        if budget is None or not layers:
            return None
        return budget.loss(torch.stack([expected_l0(l.log_alpha) for _, l in layers]).sum())


def set_progress(model: nn.Module, fraction: float) -> None:
    """Advance SaLoRA's budget schedule (0 at the first step, 1 at the last)."""
    budget = getattr(model, "salora_budget", None)
    if budget is not None:
        budget.progress.fill_(float(fraction))
