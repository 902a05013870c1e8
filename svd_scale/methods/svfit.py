"""SVFit: train only the top-r singular values.

Source: Sun et al., "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained
Models Using Singular Values", arXiv 2409.05926 (Sec. 3): the top-r singular values
become trainable and scale the fixed top-r singular subspaces; the rest of W is frozen.

    y = W_res x + U_r diag(sigma) V_r^T x + b,   W_res = W - U_r diag(sigma0) V_r^T

This is ``svd_scale`` without the output scale vector, so it reuses that layer with
``scale`` fixed to ``none`` and ``sigma`` itself trained, as the paper does
(``sigma_update: absolute``); trainable parameters: r per layer.
"""
from __future__ import annotations

from .svd_scale import SVDScaleLayer


FIXED = {"scale": "none", "sigma_update": "absolute"}  # svd_scale's options, as SVFit sets them


class SVFitLayer(SVDScaleLayer):
    method = "svfit"
    options = {}
    #: best mean validation rate of bench/quality.py's rotten_tomatoes grid (120 steps, 2 seeds; bench/results/quality.md);
    #: absolute sigma updates, so its best rate still moves between tasks (1e-1 on the other two)
    default_lr = 3e-2

    def __init__(self, base_layer, rank, opts, factor_dtype, device=None):
        super().__init__(base_layer, rank, {**opts, **FIXED}, factor_dtype, device)

    @staticmethod
    def shapes(out_f, in_f, rank, opts):
        return SVDScaleLayer.shapes(out_f, in_f, rank, {**opts, **FIXED})

    @staticmethod
    def init(W, rank, opts, svd_fn, generator):
        return SVDScaleLayer.init(W, rank, {**opts, **FIXED}, svd_fn, generator)

    @classmethod
    def merge(cls, W_res, t, opts):
        return SVDScaleLayer.merge(W_res, t, {**opts, **FIXED})
