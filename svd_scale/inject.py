"""Put adapters into a model: find targets, check them, wrap them, initialize them.

``apply(model, cfg)`` runs in four steps, each complete before the next starts:

1. ``find_targets`` -- module names to adapt; a name that matches nothing is an error.
2. ``check_ranks``  -- every target's shape against the rank, *before* any SVD.
3. ``wrap``         -- replace each target by its method's layer (structure only).
4. ``initialize``   -- read each weight, decompose it, fill the adapter tensors and
   overwrite the weight in place with the residual. How weights are read and written
   (a local tensor or a ZeRO-3 shard) is the job of a
   :class:`WeightAccess`; the math never sees sharding.
"""
from __future__ import annotations

import logging
import re
from typing import Iterator, Optional

import torch
from torch import nn

from . import svd as svdlib
from .config import AdapterConfig
from .layer import AdapterLayer, Role, TrainingState, is_conv1d, is_linear_like, logical_shape
from .methods import get_method, resolve_options

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
    opts = {**resolve_options(cfg), "config_rank": cfg.rank}  # the configured r, before any pruning
    layers = []
    for name, m in targets:
        r = (ranks or {}).get(name, cfg.rank)
        dev = m.weight.device if m.weight.device.type != "meta" else None
        layer = cls(m, r, opts, factor_dtype_for(cfg, m), device=dev)
        # how the frozen residual is stored (read by write_residual, never by forward)
        layer.quant, layer.double_quant = cfg.quant, cfg.double_quant
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


# ----------------------------------------------------------------------------- weights
def to_out_in(module: nn.Module, W: torch.Tensor) -> torch.Tensor:
    """A module's weight tensor as out x in (GPT-2's Conv1D stores in x out)."""
    return W.t() if is_conv1d(module) else W


def from_out_in(module: nn.Module, W: torch.Tensor) -> torch.Tensor:
    return W.t().contiguous() if is_conv1d(module) else W


class WeightAccess:
    """How ``initialize`` reads full weights and writes results. This one is for
    weights that live whole in this process; the ZeRO-3 subclass gathers and spreads
    the work (``svd_scale/distributed.py``), and an FSDP2 one would do the same."""

    def run(self, layers: list[tuple[str, AdapterLayer]], compute) -> None:
        for i, (name, layer) in enumerate(layers):
            with torch.no_grad():
                W = compute_dtype(to_out_in(layer.base_layer, layer.base_layer.weight.detach()))
                tensors = compute(i, name, layer, W)
                load_tensors(layer, tensors)
                write_residual(layer, W)


def compute_dtype(W: torch.Tensor) -> torch.Tensor:
    """Init math runs in fp32 -- or float64 for a float64 model (tests' exact reference)."""
    return W if W.dtype == torch.float64 else W.float()


def load_tensors(layer: AdapterLayer, tensors: dict[str, torch.Tensor]) -> None:
    """Copy fp32 init values into the layer's parameters (casting to their storage dtype)."""
    own = layer.tensors()
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise KeyError(f"{layer.method}: missing tensors {missing}")
    for n, p in own.items():
        t = tensors[n]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{layer.method}.{n}: expected shape {tuple(p.shape)}, got {tuple(t.shape)}")
        p.data.copy_(t.to(device=p.device, dtype=p.dtype))


def residual_of(layer: AdapterLayer, W: torch.Tensor) -> torch.Tensor:
    """``W - removed`` in fp32, from the tensors as stored (so the split is exact)."""
    W = compute_dtype(W)
    rem = type(layer).removed(layer.fp32_tensors(W.dtype), layer.opts)
    return W if rem is None else W - rem.to(W.device)


def write_residual(layer: AdapterLayer, W: torch.Tensor) -> None:
    """Store ``W - removed`` as the frozen residual: in place in the base weight (same
    shape and dtype -- what ZeRO-3's GatheredParameters needs), or as NF4 in a
    bitsandbytes Linear4bit that replaces the base layer (``quant: nf4``)."""
    res = residual_of(layer, W)
    if getattr(layer, "quant", "none") == "nf4":
        from .quant import linear4bit_from

        layer.base_layer = linear4bit_from(layer.base_layer, res, layer.compute_dtype, layer.double_quant)
        return
    weight = layer.base_layer.weight
    weight.data.copy_(from_out_in(layer.base_layer, res).to(weight.dtype))


def svd_function(cfg: AdapterConfig):
    def fn(W: torch.Tensor, rank: int) -> svdlib.SVD:
        return svdlib.decompose(W, rank, algorithm=cfg.svd, niter=cfg.niter, oversample=cfg.oversample)

    if cfg.refine_iters() > 1:
        from .quant import refine_factors

        return lambda W, rank: refine_factors(W, rank, cfg.refine_iters(), fn, cfg.double_quant)[0]
    return fn


def layer_generator(seed: int, index: int, device) -> torch.Generator:
    """Per-layer RNG so random inits do not depend on which rank computes them."""
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + index)
    return g


def initialize(layers: list[tuple[str, AdapterLayer]], cfg: AdapterConfig, access: Optional[WeightAccess] = None,
               seed: int = 0) -> None:
    """Fill every adapter from its weight's SVD and overwrite the weight by the residual."""
    svd_fn = svd_function(cfg)

    def compute(i, name, layer, W):
        t = type(layer).init(W, layer.rank, layer.opts, svd_fn, layer_generator(seed, i, W.device))
        return {k: compute_dtype(v) for k, v in t.items()}

    (access or WeightAccess()).run(layers, compute)


# ----------------------------------------------------------------------------- freezing, counts
def attach_training_state(model: nn.Module, layers) -> None:
    """A method's model-level state (SaLoRA's budget), then the regularizer module."""
    from .losses import attach_regularizer

    attach = getattr(type(layers[0][1]), "attach", None) if layers else None
    if attach is not None:
        attach(model, layers)
    attach_regularizer(model, layers)


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


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, counting sharded parameters at full size.
    A 4-bit residual counts its logical elements (as PEFT and bitsandbytes report)."""
    trainable = total = 0
    for p in model.parameters():
        n = _numel(p)
        if getattr(p, "quant_state", None) is not None:
            n = int(p.quant_state.shape.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def apply(model: nn.Module, cfg: Optional[AdapterConfig] = None, *, access: Optional[WeightAccess] = None,
          seed: int = 0) -> nn.Module:
    """Replace the target layers of ``model`` by ``cfg.method`` adapters, initialized from
    each weight's SVD so that the model's output is unchanged; freeze all but the
    adapter trainables. Modifies ``model`` in place and returns it."""
    cfg = cfg or AdapterConfig()
    if any(True for _ in adapter_layers(model)):
        raise ValueError("model already has svd_scale adapters; merge_and_unload it first or load a fresh base")
    targets = find_targets(model, cfg.target_modules)
    check_ranks(targets, cfg.rank, get_method(cfg.method))
    layers = wrap(model, targets, cfg)
    initialize(layers, cfg, access=access, seed=seed)
    attach_training_state(model, layers)
    mark_trainable(model)
    model.svd_scale_config = cfg
    trainable, total = parameter_counts(model)
    log.info("svd_scale: %s r=%d on %d layers | trainable params: %s || all params: %s || trainable%%: %.4f",
             cfg.method, cfg.rank, len(layers), f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return model
