"""SVFit: train only the top-r singular values.

Source: Sun et al., "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained
Models Using Singular Values", arXiv 2409.05926 (Sec. 3): the top-r singular values
become trainable and scale the fixed top-r singular subspaces; the rest of W is frozen.

    y = W_res x + U_r diag(sigma) V_r^T x + b,   W_res = W - U_r diag(sigma0) V_r^T

This is ``svd_scale`` without the output scale vector, so it reuses that layer with
``scale`` fixed to ``none``; trainable parameters: r per layer.
"""
from __future__ import annotations

from .svd_scale import SVDScaleLayer


class SVFitLayer(SVDScaleLayer):
    method = "svfit"
    options = {}

    def __init__(self, base_layer, rank, opts, factor_dtype, device=None):
        super().__init__(base_layer, rank, {**opts, "scale": "none"}, factor_dtype, device)

    @staticmethod
    def shapes(out_f, in_f, rank, opts):
        return SVDScaleLayer.shapes(out_f, in_f, rank, {**opts, "scale": "none"})

    @staticmethod
    def init(W, rank, opts, svd_fn, generator):
        return SVDScaleLayer.init(W, rank, {**opts, "scale": "none"}, svd_fn, generator)

    @staticmethod
    def merge(W_res, t, opts):
        return SVDScaleLayer.merge(W_res, t, {**opts, "scale": "none"})
