"""The one mechanism by which a method's extra loss enters training.

``regularization_loss(model)`` sums every adapter layer's ``regularizer()`` and
divides by the number of layers that have one (METHODS.md: SORSA's term is averaged
over layers), plus a method's model-level term if it has one (SaLoRA's rank budget). The Trainer in ``svd_scale.training`` adds it to the task loss; a
user's own loop does ``loss = task_loss + svd_scale.regularization_loss(model)``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def regularization_loss(model: nn.Module) -> Optional[torch.Tensor]:
    from .inject import adapter_layers

    layers = list(adapter_layers(model))
    terms = [t for _, layer in layers if (t := layer.regularizer()) is not None]
    total = torch.stack([t.float() for t in terms]).sum() / len(terms) if terms else None
    model_term = getattr(type(layers[0][1]), "model_regularizer", None) if layers else None
    extra = model_term(model, layers) if model_term is not None else None
    if extra is not None:
        total = extra if total is None else total + extra
    return total
