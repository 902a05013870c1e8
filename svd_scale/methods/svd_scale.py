"""svd_scale: train only the top-r singular values and a per-output scale vector.

Source: Lin, Guo, Zhang, Guo, "Adaptation fine-tuning based on singular value
decomposition", Computer Systems & Applications, 2024 -- "only the diagonal matrix
and a scaling vector obtained from SVD are trained". The paper's text beyond the
abstract is unavailable here; ``docs/methods.md`` fixes the open choice:
``s`` scales each output channel of the whole layer (init 1), so the init is exact
and the frozen residual can adapt per channel too.

    y = s * (W_res x + U_r diag(sigma) V_r^T x) + b,   W_res = W - U_r diag(sigma0) V_r^T

Trainable (fp32): the singular values and ``scale`` (out). Frozen: ``U`` (out x r), ``Vh``
(r x in), residual. ``scale: none`` drops ``s`` (then the method is SVFit, Sun et al. 2024).

How the singular values train (``sigma_update``, docs/methods.md "Learning rate"):

* ``relative`` (default): the trained tensor is ``sigma_delta`` (r, init 0) and
  ``sigma = sigma0 * (1 + sigma_delta)``. Adam moves each parameter by about the learning
  rate per step whatever its magnitude, so this moves every singular value -- 1 or 80 --
  and ``s`` (init 1) by the same *fraction* per step: one rate fits every layer, both
  tensors and models whose singular values are larger (a 7B model's are). Weight decay
  pulls towards the base model's values, not towards 0.
* ``absolute``: ``sigma`` itself trains (the paper's literal form, and adapters saved
  before the option existed): a step changes a singular value of 1 by 80x more, relatively, than one of 80,
  so the best rate moves with the layers' spectrum (measured in bench/results/quality.md).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..layer import AdapterLayer, Option, Role, one_of


def plain_forward(h, x, Vh, U, sigma, scale=None, bias=None):
    """The layer's map after the base layer (``h = W_res x + b``) in plain autograd ops:
    the default path, and the formula :class:`ScaledLowRank` must equal (gradcheck)."""
    p = h + F.linear(F.linear(x, Vh) * sigma, U).to(h.dtype)
    if scale is None:
        return p
    return p * scale if bias is None else p * scale + bias * (1 - scale)


class ScaledLowRank(torch.autograd.Function):
    """``y = s * (h + U diag(sigma) V^T x) + b (1 - s)`` in as few passes over the
    (tokens x out) activations as cuBLAS allows (with tiny adapter math the
    cost of the layer is its extra elementwise passes and kernel launches).

    Forward: ``a = x V`` (tokens x r), then one ``addmm`` adds ``a (U diag(sigma))^T`` to
    ``h`` inside the GEMM, then one scale pass -- 2 passes over tokens x out instead of the
    plain formula's 4 (matmul output, add, scale, and autograd's saved copies).
    Saves ``x`` (the base layer keeps it anyway), ``a`` (tokens x r) and, only when ``s``
    trains, the pre-scale output ``p``. Backward: ``g*s`` once (it is also the base layer's
    incoming gradient), ``ds = sum(g*p) - b*sum(g)`` and ``dsigma = sum((g s U) * a)``
    reduced in fp32, ``dx = ((g s U) * sigma) V^T``; ``U``/``V`` get no gradient (frozen).
    Autocast is off inside: the work dtype is ``h``'s, chosen by the base layer.

    Not the default (``SVDScaleLayer.fused``): on the H100 the 7B-shaped training step is
    bound by kernel launches on the host, and this function's Python backward costs more
    host time than the plain ops' C++ autograd nodes save; it measured slower
    (bench/results/perf_notes.md). It stays, tested, for GPU-bound settings.
    """

    @staticmethod
    def forward(ctx, h, x, Vh, U, sigma, scale, bias):
        with torch.autocast(h.device.type, enabled=False):
            wd = h.dtype
            h2, x2 = h.reshape(-1, h.shape[-1]), x.reshape(-1, x.shape[-1]).to(wd)
            Vh_w, U_w, sig_w = Vh.to(wd), U.to(wd), sigma.to(wd)
            a = x2 @ Vh_w.t()
            p = torch.addmm(h2, a, (U_w * sig_w).t())
            if scale is None:
                y = p
            else:
                s_w = scale.to(wd)
                y = p * s_w if bias is None else torch.addcmul(bias.to(wd) * (1 - s_w), p, s_w)
        keep_p = scale is not None and ctx.needs_input_grad[5]
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.save_for_backward(x2, a, p if keep_p else None, Vh_w, U_w, sig_w,
                              None if scale is None else s_w, None if bias is None else bias)
        return y.view(h.shape)

    @staticmethod
    def backward(ctx, g):
        x2, a, p, Vh_w, U_w, sig_w, s_w, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        with torch.autocast(g.device.type, enabled=False):
            g2 = g.reshape(-1, g.shape[-1])
            acc = torch.promote_types(g.dtype, torch.float32)  # fp32 sums for bf16; fp64 stays fp64
            gs = g2 if s_w is None else g2 * s_w
            d_scale = None
            if p is not None:
                d_scale = (g2 * p).sum(0, dtype=acc)
                if bias is not None:
                    d_scale -= bias.to(acc) * g2.sum(0, dtype=acc)
            dz = gs @ U_w  # (tokens, r)
            d_sigma = (dz * a).sum(0, dtype=acc) if need[4] else None
            d_x = ((dz * sig_w) @ Vh_w).to(ctx.x_dtype).view(ctx.x_shape) if need[1] else None
        return (gs.view(g.shape) if need[0] else None, d_x, None, None, d_sigma,
                d_scale, None)


def fused_forward(h, x, Vh, U, sigma, scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None):
    """The svd_scale layer's map after the base layer (autograd casts the fp32-reduced
    gradients of ``sigma``/``scale`` to their parameters' dtypes)."""
    return ScaledLowRank.apply(h, x, Vh, U, sigma, scale, bias)


class SVDScaleLayer(AdapterLayer):
    method = "svd_scale"
    #: with ``sigma_update: relative``: the best mean validation rate of bench/quality.py's rotten_tomatoes grid
    #: (120 steps, 2 seeds), checked on two other tasks (bench/results/quality.md)
    default_lr = 1e-2
    roles = {"sigma": Role.TRAINABLE, "sigma_delta": Role.TRAINABLE, "scale": Role.TRAINABLE, "U": Role.FACTOR,
             "Vh": Role.FACTOR, "sigma0": Role.INIT}
    options = {"scale": Option("output", "svd_scale: 'output' (a per-output-channel scale s, init 1) or 'none'",
                               one_of("output", "none")),
               "sigma_update": Option("relative", "svd_scale: 'relative' (train sigma_delta, sigma = sigma0 * (1 + "
                                      "sigma_delta): one rate moves every singular value by the same fraction) or "
                                      "'absolute' (train sigma itself)", one_of("relative", "absolute"),
                                      saved_default="absolute")}
    needs_svd = "top"
    #: use the ScaledLowRank autograd function instead of plain ops (see its docstring)
    fused: bool = False

    def __init__(self, base_layer, rank, opts, factor_dtype, device=None):
        # declared roles follow the options: no unused parameter
        self.roles = {k: v for k, v in self.roles.items() if k in self.shapes(1, 1, 1, opts)}
        super().__init__(base_layer, rank, opts, factor_dtype, device)

    @staticmethod
    def shapes(out_f, in_f, rank, opts):
        trained = "sigma_delta" if opts["sigma_update"] == "relative" else "sigma"
        s = {trained: (rank,), "U": (out_f, rank), "Vh": (rank, in_f), "sigma0": (rank,)}
        if opts["scale"] == "output":
            s["scale"] = (out_f,)
        return s

    @staticmethod
    def init(W, rank, opts, svd_fn, generator):
        f = svd_fn(W, rank)
        t = {"U": f.U, "Vh": f.Vh, "sigma0": f.S.clone()}
        if opts["sigma_update"] == "relative":
            t["sigma_delta"] = torch.zeros_like(f.S)
        else:
            t["sigma"] = f.S.clone()
        if opts["scale"] == "output":
            t["scale"] = torch.ones(W.shape[0], dtype=torch.float32, device=W.device)
        return t

    @staticmethod
    def singular_values(t):
        """The adapter's current singular values from its stored tensors (either ``sigma_update``)."""
        return t["sigma"] if "sigma" in t else t["sigma0"] * (1 + t["sigma_delta"])

    @staticmethod
    def removed(t, opts):
        return (t["U"] * t["sigma0"]) @ t["Vh"]

    @classmethod
    def merge(cls, W_res, t, opts):
        W = W_res + (t["U"] * cls.singular_values(t)) @ t["Vh"]
        return W * t["scale"].unsqueeze(1) if "scale" in t else W

    @classmethod
    def as_low_rank(cls, t, opts):
        """``s * (W - U sigma0 Vh + U sigma Vh) = s * (W + (U (sigma - sigma0)) Vh)``: exactly a DoRA
        adapter of rank r (magnitude ``s * ||W + B A||`` per row), or a LoRA when ``s`` is absent."""
        change = t["sigma0"] * t["sigma_delta"] if "sigma_delta" in t else t["sigma"] - t["sigma0"]
        return t["U"] * change, t["Vh"], t.get("scale")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)  # W_res x + b
        scale = self.scale if "scale" in self.roles else None
        # s * (W_res x + delta) + b == s * (h - b) + b: the bias stays outside the scale.
        bias = getattr(self.base_layer, "bias", None) if scale is not None else None
        sigma = self.singular_values(self.tensors())
        if self.fused:
            return fused_forward(h, x, self.Vh, self.U, sigma, scale, bias)
        return plain_forward(h, x, self.cast(self.Vh, x), self.cast(self.U, x), self.cast(sigma, x),
                             None if scale is None else self.cast(scale, h), None if bias is None else self.cast(bias, h))
