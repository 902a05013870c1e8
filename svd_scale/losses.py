"""The one mechanism by which a method's extra loss enters training.

``regularization_loss(model)`` averages every adapter layer's ``regularizer()`` over
the layers that have one (SORSA's term is averaged over layers) and adds the method's
model-level term if any (SaLoRA's rank budget). The Trainer in ``svd_scale.training``
adds it to the task loss; a user's own loop does
``loss = task_loss + svd_scale.regularization_loss(model)``.

Why a module: under ZeRO-3 a parameter is only whole inside the forward of a module
that owns it, and the regularizer reads the adapters' parameters *after* their layers
ran. So the sum is the forward of :class:`Regularizer`, a small module attached to the
model; the weight access that built the adapters wires it to the sharding
(``WeightAccess.wire_regularizer``: ZeRO-3 registers its inputs as external parameters,
FSDP2 gathers them around its forward).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .layer import TrainingState


class Regularizer(TrainingState):
    """Computes the method's extra loss; holds no parameters of its own."""

    def __init__(self, model: nn.Module, layers: list):
        super().__init__()
        # plain references, not submodules: the layers already live in the model's tree
        self.__dict__["_model"] = model
        self.__dict__["_layers"] = list(layers)

    def read_parameters(self) -> list[nn.Parameter]:
        params = [p for _, l in self._layers for p in l.parameters() if p.requires_grad]
        params += [p for m in self._model.modules() if isinstance(m, TrainingState) and m is not self for p in m.parameters()]
        return params

    def forward(self) -> Optional[torch.Tensor]:
        layers = self._layers
        terms = [t for _, layer in layers if (t := layer.regularizer()) is not None]
        total = torch.stack([t.float() for t in terms]).sum() / len(terms) if terms else None
        extra = type(layers[0][1]).model_regularizer(self._model, layers) if layers else None
        if extra is not None:
            total = extra if total is None else total + extra
        return total


def attach_regularizer(model: nn.Module, layers: list) -> Optional[Regularizer]:
    """Attach a Regularizer if the method has an extra loss (after all training state exists)."""
    if not layers or not type(layers[0][1]).has_regularizer():
        return None
    model.svd_scale_regularizer = Regularizer(model, layers)
    return model.svd_scale_regularizer


def regularization_loss(model: nn.Module) -> Optional[torch.Tensor]:
    reg = getattr(model, "svd_scale_regularizer", None)
    return reg() if reg is not None else None
