"""The one mechanism by which a method's extra loss enters training.

``regularization_loss(model)`` sums every adapter layer's ``regularizer()`` and
divides by the number of layers that have one (METHODS.md: SORSA's term is averaged
over layers). The Trainer in ``svd_scale.training`` adds it to the task loss; a
user's own loop does ``loss = task_loss + svd_scale.regularization_loss(model)``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def regularization_loss(model: nn.Module) -> Optional[torch.Tensor]:
    from .inject import adapter_layers

    terms = [t for _, layer in adapter_layers(model) if (t := layer.regularizer()) is not None]
    if not terms:
        return None
    return torch.stack([t.float() for t in terms]).sum() / len(terms)
