"""svd_scale: train only the top-r singular values and a per-output scale vector.

Source: Lin, Guo, Zhang, Guo, "Adaptation fine-tuning based on singular value
decomposition", Computer Systems & Applications, 2024 -- "only the diagonal matrix
and a scaling vector obtained from SVD are trained". The paper's text beyond the
abstract is unavailable here; ``../shared/METHODS.md`` fixes the open choice:
``s`` scales each output channel of the whole layer (init 1), so the init is exact
and the frozen residual can adapt per channel too.

    y = s * (W_res x + U_r diag(sigma) V_r^T x) + b,   W_res = W - U_r diag(sigma0) V_r^T

Trainable (fp32): ``sigma`` (r), ``scale`` (out). Frozen: ``U`` (out x r), ``Vh`` (r x in),
residual. ``scale: none`` drops ``s`` (then the method is SVFit, Sun et al. 2024).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layer import AdapterLayer, Role


class SVDScaleLayer(AdapterLayer):
    method = "svd_scale"
    roles = {"sigma": Role.TRAINABLE, "scale": Role.TRAINABLE, "U": Role.FACTOR, "Vh": Role.FACTOR, "sigma0": Role.INIT}
    options = {"scale": "output"}
    needs_svd = "top"

    def __init__(self, base_layer, rank, opts, factor_dtype, device=None):
        if opts["scale"] == "none":  # declared roles follow the option: no unused parameter
            self.roles = {k: v for k, v in self.roles.items() if k != "scale"}
        super().__init__(base_layer, rank, opts, factor_dtype, device)

    @staticmethod
    def check_options(opts: dict) -> None:
        if opts["scale"] not in ("output", "none"):
            raise ValueError(f"adapter.scale must be 'output' or 'none' for svd_scale, got {opts['scale']!r}")

    @staticmethod
    def shapes(out_f, in_f, rank, opts):
        s = {"sigma": (rank,), "U": (out_f, rank), "Vh": (rank, in_f), "sigma0": (rank,)}
        if opts["scale"] == "output":
            s["scale"] = (out_f,)
        return s

    @staticmethod
    def init(W, rank, opts, svd_fn, generator):
        f = svd_fn(W, rank)
        t = {"sigma": f.S.clone(), "U": f.U, "Vh": f.Vh, "sigma0": f.S.clone()}
        if opts["scale"] == "output":
            t["scale"] = torch.ones(W.shape[0], dtype=torch.float32, device=W.device)
        return t

    @staticmethod
    def removed(t, opts):
        return (t["U"] * t["sigma0"]) @ t["Vh"]

    @staticmethod
    def merge(W_res, t, opts):
        W = W_res + (t["U"] * t["sigma"]) @ t["Vh"]
        return W * t["scale"].unsqueeze(1) if "scale" in t else W

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)  # W_res x + b
        z = F.linear(x, self.cast(self.Vh, x)) * self.cast(self.sigma, x)
        h = h + F.linear(z, self.cast(self.U, x)).to(h.dtype)
        if "scale" not in self.roles:
            return h
        # s * (W_res x + delta) + b == s * (h - b) + b: the bias stays outside the scale.
        s = self.cast(self.scale, h)
        bias = getattr(self.base_layer, "bias", None)
        if bias is None:
            return h * s
        return h * s + self.cast(bias, h) * (1 - s)
