"""svd_scale: SVD-based adapters for large language models under DeepSpeed ZeRO-3 or FSDP2,
with an optional 4-bit NF4 residual.

    import svd_scale
    model = svd_scale.apply(model, svd_scale.AdapterConfig(method="svd_scale", rank=64))
    ...train with your own loop or transformers.Trainer...
    svd_scale.save_adapter(model, "out/adapter")
    merged = svd_scale.merge_and_unload(model)   # a plain transformers model

``apply`` recognises a model built under ``deepspeed.zero.Init`` or sharded with ``fully_shard``
by itself. Importing this package never imports deepspeed or bitsandbytes; those load only when a
sharded or 4-bit path is used.
"""
from . import engines  # noqa: F401  (registers the ZeRO-3 and FSDP2 weight accesses)
from .config import AdapterConfig, RunConfig, TrainConfig, load_config
from .inject import adapter_layers, apply, parameter_counts
from .export import export_merged, export_peft
from .io import load_adapter, merge_and_unload, save_adapter
from .layer import AdapterLayer, Option, Role
from .losses import regularization_loss
from .methods import METHODS, register_method

__all__ = ["AdapterConfig", "TrainConfig", "RunConfig", "load_config", "apply", "adapter_layers", "parameter_counts",
           "save_adapter", "load_adapter", "merge_and_unload", "export_peft", "export_merged", "AdapterLayer", "Option", "Role", "METHODS",
           "register_method", "regularization_loss"]
__version__ = "0.1.0"
