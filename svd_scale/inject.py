"""Put adapters into a model: find targets, check them, wrap them, initialize them.

``apply(model, cfg)`` is the one pipeline that puts adapters on a model -- a fresh adapter from
the SVD, a saved one (``load_adapter``) and the FSDP2 sharded loader all run it:

1. ``source.plan``  -- the targets and their ranks; a name that matches nothing or a rank that does
   not fit a layer is an error, *before* any weight is read.
2. ``wrap``         -- replace each target by its method's layer (structure only).
3. ``finish``       -- the access reads each weight, the source gives the adapter's values (an SVD,
   or a file), and the residual ``W - removed`` goes to the configured storage; then model-level
   training state, the regularizer, freezing.

Two things are pluggable: the *source* of values (:class:`SVDSource`, ``io.SavedAdapter``) and the
*access* to weights (``svd_scale.access``: whole tensors, ZeRO-3 partitions, FSDP2 DTensors), which
is picked from the model itself unless given. The math never sees sharding or quantization.
"""
from __future__ import annotations

import logging
import re
from typing import Iterator, Optional

import torch
from torch import nn

from . import svd as svdlib
from .access import WeightAccess, access_for
from .config import AdapterConfig
from .layer import WHOLE_ATTR, AdapterLayer, Role, TrainingState, is_linear_like, logical_shape, math_dtype
from .losses import attach_regularizer
from .methods import get_method
from .quant import logical_numel

log = logging.getLogger("svd_scale")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- targets
def _output_head_names(model: nn.Module) -> set:
    names = set()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for n, m in model.named_modules():
        if head is not None and m is head:
            names.add(n)
        if n.split(".")[-1] in ("lm_head", "embed_out", "score", "classifier", "qa_outputs"):
            names.add(n)
    return names


def find_targets(model: nn.Module, target_modules) -> list[tuple[str, nn.Module]]:
    """Linear-like modules selected by ``target_modules`` (see AdapterConfig)."""
    linear = [(n, m) for n, m in model.named_modules() if is_linear_like(m) and not isinstance(m, AdapterLayer)]
    linear = [(n, m) for n, m in linear if ".base_layer" not in n]
    candidates = sorted({n.split(".")[-1] for n, _ in linear})
    if target_modules == "all-linear":
        heads = _output_head_names(model)
        out = [(n, m) for n, m in linear if n not in heads]
    elif isinstance(target_modules, str):
        rx = re.compile(target_modules)
        out = [(n, m) for n, m in linear if rx.fullmatch(n)]
        if not out:
            raise ValueError(f"target_modules regex {target_modules!r} matched no linear layer; candidate names: {candidates}")
    else:
        wanted = [str(t) for t in target_modules]
        out = [(n, m) for n, m in linear if n.split(".")[-1] in wanted or n in wanted]
        missing = [t for t in wanted if not any(n.split(".")[-1] == t or n == t for n, _ in out)]
        if missing:
            raise ValueError(f"target_modules {missing} match no linear layer in {type(model).__name__}; candidate names: {candidates}")
    if not out:
        raise ValueError(f"no linear layer to adapt in {type(model).__name__}; candidate names: {candidates}")
    return out


def check_ranks(targets: list[tuple[str, nn.Module]], rank: int, cls: type[AdapterLayer]) -> None:
    """Reject a rank that does not fit a target's shape, naming the layer -- before any work."""
    limit_bottom = cls.needs_svd == "bottom"
    for name, m in targets:
        out_f, in_f = logical_shape(m)
        k = min(out_f, in_f)
        hi = k - 1 if limit_bottom else k
        if not 0 < rank <= hi:
            raise ValueError(
                f"adapter.rank={rank} does not fit layer {name!r} ({out_f}x{in_f}): method {cls.method!r} "
                f"needs 1 <= rank <= {hi} (min(out, in){' - 1' if limit_bottom else ''})"
            )


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def factor_dtype_for(cfg: AdapterConfig, base: nn.Module) -> torch.dtype:
    if cfg.factor_dtype != "auto":
        return _DTYPES[cfg.factor_dtype]
    dt = base.weight.dtype
    return dt if dt.is_floating_point else torch.bfloat16


def wrap(model: nn.Module, targets, cfg: AdapterConfig, ranks: Optional[dict] = None) -> list[tuple[str, AdapterLayer]]:
    """Replace each target by an (uninitialized) adapter layer; return them in model order."""
    cls = get_method(cfg.method)
    opts = {**cfg.method_options(), "config_rank": cfg.rank}  # the configured r, before any pruning
    layers = []
    for name, m in targets:
        r = (ranks or {}).get(name, cfg.rank)
        dev = m.weight.device if m.weight.device.type != "meta" else None
        layer = cls(m, r, opts, factor_dtype_for(cfg, m), device=dev)
        layer.storage = cfg.storage()  # how the frozen residual is stored (used at init, never by forward)
        layer.compute_dtype = m.weight.dtype if m.weight.dtype.is_floating_point else torch.bfloat16
        _set_module(model, name, layer)
        layers.append((name, layer))
    return layers


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (the unit FSDP2 shards and ``train.compile`` compiles)."""
    layers = getattr(getattr(model, "model", None), "layers", None) or getattr(getattr(model, "transformer", None), "h", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} "
                         "(expected model.model.layers or model.transformer.h)")
    return list(layers)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for n, m in model.named_modules():
        if isinstance(m, AdapterLayer):
            yield n, m


# ----------------------------------------------------------------------------- values
def svd_function(cfg: AdapterConfig):
    """``fn(W, rank)`` -> the top-r SVD the config asks for (refined against the storage's rounding
    when the residual is quantized and ``quant_iters`` > 1)."""
    def fn(W: torch.Tensor, rank: int) -> svdlib.SVD:
        return svdlib.decompose(W, rank, algorithm=cfg.svd, niter=cfg.niter, oversample=cfg.oversample)

    iters, storage = cfg.refine_iters(), cfg.storage()
    return (lambda W, rank: storage.refine(W, rank, iters, fn)) if iters > 1 else fn


def layer_generator(seed: int, index: int, device) -> torch.Generator:
    """Per-layer RNG so random inits do not depend on which rank computes them."""
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + index)
    return g


class SVDSource:
    """Where a fresh adapter's values come from: each target weight's SVD (the method's ``init``).
    The other source is a saved adapter (``svd_scale.io.SavedAdapter``); both feed one pipeline."""

    def __init__(self, cfg: AdapterConfig, seed: int = 0):
        self.cfg, self.seed, self.svd_fn = cfg, seed, svd_function(cfg)

    def plan(self, model: nn.Module) -> tuple[list[tuple[str, nn.Module]], dict]:
        """The targets and their ranks (all ``cfg.rank``), checked before any weight is read."""
        targets = find_targets(model, self.cfg.target_modules)
        check_ranks(targets, self.cfg.rank, get_method(self.cfg.method))
        return targets, {}

    def __call__(self, i: int, name: str, layer: AdapterLayer, W: torch.Tensor) -> dict:
        t = type(layer).init(W, layer.rank, layer.opts, self.svd_fn, layer_generator(self.seed, i, W.device))
        return {k: math_dtype(v) for k, v in t.items()}


# ----------------------------------------------------------------------------- freezing, counts
def attach_training_state(model: nn.Module, layers) -> Optional[nn.Module]:
    """A method's model-level state (SaLoRA's budget), then its regularizer module (if any)."""
    if not layers:
        return None
    type(layers[0][1]).attach(model, layers)
    return attach_regularizer(model, layers)


def mark_trainable(model: nn.Module) -> None:
    """Freeze everything; then unfreeze exactly the tensors whose declared role is TRAINABLE."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in adapter_layers(model):
        for p in layer.tensors((Role.TRAINABLE,)).values():
            p.requires_grad_(True)
    for m in model.modules():
        if isinstance(m, TrainingState):
            for p in m.parameters():
                p.requires_grad_(True)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, counting sharded parameters at full size and a 4-bit
    residual at its logical size (as PEFT and bitsandbytes report), and the adapters' frozen tensors and
    residuals also where an engine keeps them as buffers (ZeRO-3), so every engine reports the same total."""
    trainable = total = 0
    for p in model.parameters():
        n = logical_numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    params = {id(p) for p in model.parameters()}
    for _, layer in adapter_layers(model):
        total += sum(t.numel() for t in layer.tensors().values() if id(t) not in params)
        # a residual's parameters that an engine keeps as buffers (layer.WHOLE_ATTR names them)
        total += sum(logical_numel(getattr(layer.base_layer, n)) for n in getattr(layer.base_layer, WHOLE_ATTR, ()))
    return trainable, total


def finish(model: nn.Module, layers: list[tuple[str, AdapterLayer]], cfg: AdapterConfig, source,
           access: WeightAccess) -> nn.Module:
    """Step 3 of the pipeline (module docstring), on layers already wrapped."""
    access.run(layers, source)
    regularizer = attach_training_state(model, layers)
    if regularizer is not None:
        access.wire_regularizer(model, regularizer)
    mark_trainable(model)
    model.svd_scale_config = cfg
    trainable, total = parameter_counts(model)
    log.info("svd_scale: %s r=%d on %d layers | trainable params: %s || all params: %s || trainable%%: %.4f",
             cfg.method, cfg.rank, len(layers), f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return model


def apply(model: nn.Module, cfg: Optional[AdapterConfig] = None, *, source=None,
          access: Optional[WeightAccess] = None, seed: int = 0) -> nn.Module:
    """Replace the target layers of ``model`` by ``cfg.method`` adapters, initialized so that the
    model's output is unchanged (from each weight's SVD, or from ``source``); freeze all but the
    adapter trainables. Modifies ``model`` in place and returns it.

    Works as is on a model built under ``deepspeed.zero.Init`` or sharded with FSDP2's
    ``fully_shard``: the weight access is picked from the model's parameters (``access`` overrides)."""
    cfg = cfg or AdapterConfig()
    if any(True for _ in adapter_layers(model)):
        raise ValueError("model already has svd_scale adapters; merge_and_unload it first or load a fresh base")
    source = source or SVDSource(cfg, seed)
    access = access or access_for(model)
    targets, ranks = source.plan(model)
    access.check(model, cfg)
    layers = wrap(model, targets, cfg, ranks)
    access.adopt(model, layers)
    return finish(model, layers, cfg, source, access)
