"""PyTorch FSDP2 (``fully_shard``): sharded loading and sharding-aware adapter init.

The FSDP2 counterpart of ``distributed.py`` (ZeRO-3), for ``torchrun`` jobs:

1. :func:`load_sharded` builds the model on the meta device (buffers real, via
   accelerate's ``init_empty_weights``), wraps the target layers in adapters, applies
   ``fully_shard`` to every decoder layer and the root, allocates only the local shards
   (``to_empty``) and fills each from the safetensors checkpoint by reading just this
   rank's rows (``safe_open(...).get_slice``) -- as torchtune does, no rank ever holds the
   whole model, not even while loading.
2. :class:`FSDP2Access` initializes the adapters: for each target weight every rank
   all-gathers that one weight (``DTensor.full_tensor``), its owner (``index % world``)
   alone runs the SVD, the factors are broadcast, and every rank writes its own rows of
   the factors and of the residual ``W - removed`` into its local shards. So the SVD work is
   spread over ranks and at most one full weight (plus its fp32 copy) is whole at a time.
3. Mixed precision: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` for bf16
   runs: the sharded trainables (``sigma``, ``scale``) and their optimizer state stay fp32;
   FSDP2 casts the all-gathered copies for compute.

NF4 residuals (``quant: nf4``): the target's base layer becomes a
:class:`svd_scale.quant.ShardableNF4Linear` before sharding (a ``Params4bit`` would lose its
QuantState when FSDP2 swaps in the unsharded tensor); its packed codes and block scales are
ordinary sharded parameters, and the dense weight is never a parameter: its owner reads it from
the checkpoint at init.

Checkpoints for ``--resume`` (:func:`save_optimizer` / :func:`load_optimizer`): the optimizer state
is as sharded as the parameters, so each rank writes and reads only its own rows through
``torch.distributed.checkpoint`` (DCP), as torchtitan does; the adapter itself is saved whole
(a collective export) and written back into the shards with :func:`set_full_value`.

Methods with an extra loss (SORSA, KaSA, SaLoRA) read whole parameters through
:func:`gather_for_regularizer`. SaLoRA's budget multipliers (model-level ``TrainingState``) are
created after sharding, so they are plain tensors replicated on every rank; every rank computes
the same budget term from the same gathered gate logits, so their gradients agree without a
reduction. Not yet here: double quantization.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .config import AdapterConfig
from .layer import is_conv1d
from .inject import (WeightAccess, attach_training_state, check_ranks, compute_dtype, decoder_layers, find_targets,
                     from_out_in, initialize, mark_trainable, to_out_in, wrap)
from .methods import get_method



def gather_for_regularizer(model: nn.Module) -> None:
    """Let the method's extra loss (``svd_scale.losses.Regularizer``) read whole parameters.

    It runs after the model's forward, when FSDP2 has resharded every layer, so each
    parameter it reads is a shard. For the duration of its forward, each such DTensor is
    swapped for ``full_tensor()`` -- a differentiable all-gather whose backward hands every
    rank the gradient of its own rows. Every rank computes the same term from the same values,
    so that gradient is already the global one; FSDP2 adds its reduce-scattered task gradient
    to it (``foreach_reduce`` accumulates into an existing ``.grad``). The ZeRO-3 counterpart
    is the external-parameter registration in ``distributed.register_external``."""
    reg = getattr(model, "svd_scale_regularizer", None)
    if reg is None:
        return
    owners = [layer for _, layer in reg._layers]
    swapped: list = []

    def gather(module, args):
        for m in owners:
            for name, p in list(m._parameters.items()):
                if p is not None and p.requires_grad and hasattr(p, "full_tensor"):
                    m._parameters[name] = p.full_tensor()
                    swapped.append((m, name, p))

    def release(module, args, out):
        while swapped:
            m, name, p = swapped.pop()
            m._parameters[name] = p

    reg.register_forward_pre_hook(gather)
    reg.register_forward_hook(release)


def _local_slices(p) -> tuple[slice, ...]:
    """This rank's index ranges of a DTensor parameter, per dimension."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(slice(o, o + s) for o, s in zip(offset, shape))


def _write_local(p, full: torch.Tensor) -> None:
    """Copy this rank's part of ``full`` (the whole tensor) into DTensor ``p``'s local shard."""
    local = p.to_local()
    local.copy_(full[_local_slices(p)].to(local.dtype))


def is_fsdp2(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 DTensors (built by :func:`load_sharded`)."""
    return any(hasattr(p, "to_local") for p in model.parameters())


def set_full_value(p: torch.Tensor, full: torch.Tensor) -> None:
    """Write the whole tensor ``full`` into ``p``: its local rows if ``p`` is an FSDP2 DTensor
    (every rank holds ``full``, so no communication), else all of it. The inverse of
    ``distributed.full_value``."""
    with torch.no_grad():
        if hasattr(p, "to_local"):
            _write_local(p, full.to(p.to_local().device))
        else:
            p.data.copy_(full.to(device=p.device, dtype=p.dtype))


OPTIMIZER_DIR = "optimizer_dcp"


def _inner(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def save_optimizer(model: nn.Module, optimizer, checkpoint_dir: str) -> None:
    """Write the sharded optimizer state under ``checkpoint_dir/optimizer_dcp`` (DCP: each rank
    its own rows; a collective, every rank calls it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, _inner(optimizer))
    dcp.save({"optimizer": state}, checkpoint_id=str(Path(checkpoint_dir) / OPTIMIZER_DIR))


def load_optimizer(model: nn.Module, optimizer, checkpoint_dir: str) -> None:
    """Restore what :func:`save_optimizer` wrote into ``optimizer`` (a collective). DCP reshards:
    a checkpoint written by N ranks loads under M (tests/test_fsdp2.py resumes 2 -> 3 ranks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    where = Path(checkpoint_dir) / OPTIMIZER_DIR
    if not (where / ".metadata").is_file():
        raise FileNotFoundError(f"--resume under fsdp2: {checkpoint_dir!r} has no sharded optimizer state "
                                f"({OPTIMIZER_DIR}/); it was not written by an fsdp2 run of svd_scale")
    inner = _inner(optimizer)
    state = {"optimizer": get_optimizer_state_dict(model, inner)}  # the layout to fill (states initialized)
    dcp.load(state, checkpoint_id=str(where))
    set_optimizer_state_dict(model, inner, state["optimizer"])


def shard(model: nn.Module, mp: Optional["object"] = None) -> nn.Module:
    """``fully_shard`` each decoder layer, then the root (FSDP2's recommended granularity)."""
    from torch.distributed.fsdp import fully_shard

    kw = {"mp_policy": mp} if mp is not None else {}
    for block in decoder_layers(model):
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def mixed_precision(precision: str):
    """bf16: gather/compute in bf16, reduce gradients in fp32; fp32: no policy."""
    if precision != "bf16":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def _checkpoint_files(path: str) -> list[Path]:
    p = Path(path)
    index = p / "model.safetensors.index.json"
    if index.is_file():
        return sorted({p / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = p / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"fsdp2 sharded loading reads safetensors: no model.safetensors(.index.json) in {path!r}")
    return [single]


def _base_name(name: str) -> str:
    """A wrapped model's parameter name as the base checkpoint spells it."""
    return name.replace(".base_layer.", ".")


def load_sharded(path: str, cfg: AdapterConfig, dtype: torch.dtype = torch.float32, mp=None, seed: int = 0,
                 device: Optional[torch.device] = None) -> nn.Module:
    """Build ``path``'s model sharded over the current process group, with ``cfg``'s adapters
    initialized (module docstring), on ``device`` (default: this rank's GPU if there is one).
    Bad configurations fail before any weight is read."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    cls = get_method(cfg.method)
    files = _checkpoint_files(path)
    with init_empty_weights():  # parameters on meta, buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    targets = find_targets(model, cfg.target_modules)
    check_ranks(targets, cfg.rank, cls)
    layers = wrap(model, targets, cfg)
    dense = {}  # nf4: target name -> checkpoint key of its dense weight (read by the owner only, at init)
    if cfg.quant == "nf4":
        from .quant import ShardableNF4Linear

        for name, layer in layers:
            base = layer.base_layer
            dense[name] = name + ".weight"
            with torch.device("meta"):
                layer.base_layer = ShardableNF4Linear(layer.out_features, layer.in_features, layer.compute_dtype,
                                                      bias=getattr(base, "bias", None), double_quant=cfg.double_quant)
            layer.base_layer.svd_scale_was_conv1d = is_conv1d(base)
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    shard(model, mp)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model.to_empty(device=device)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
        # checkpoint key -> local parameters to fill. fully_shard + to_empty unties a tied
        # output head (it gets its own shard), so the head is filled from the embedding's key.
        wanted: dict[str, list] = {}
        for n, p in model.named_parameters():
            if not _is_adapter_param(model, n) and not _is_nf4_param(model, n):
                wanted.setdefault(_tied_source(model, _base_name(n)), []).append(p)
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    for p in wanted.pop(key, []):
                        _write_local(p, _Rows(fh.get_slice(key)))
        if wanted:
            raise KeyError(f"fsdp2 load: {path} has no tensors for {sorted(wanted)[:5]}")
    access = FSDP2Access(_TensorReader(files) if dense else None)
    initialize(layers, cfg, access=access, seed=seed)
    model.svd_scale_fsdp_max_full_numel = access.max_full_numel
    attach_training_state(model, layers)
    gather_for_regularizer(model)
    mark_trainable(model)
    model.svd_scale_config = cfg
    return model


class _Rows:
    """Lets ``_write_local`` index a safetensors slice as if it were the whole tensor:
    only the requested rows are read from disk."""

    def __init__(self, sl):
        self.sl = sl

    def __getitem__(self, idx):
        return self.sl[idx]


def _is_adapter_param(model: nn.Module, name: str) -> bool:
    from .inject import adapter_layers

    owner, _, leaf = name.rpartition(".")
    return any(owner == n and leaf in layer.roles for n, layer in adapter_layers(model))


def _is_nf4_param(model: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf in ("weight", "absmax", "absmax2") and type(model.get_submodule(owner)).__name__ == "ShardableNF4Linear"


class _TensorReader:
    """Whole tensors by checkpoint key, read on demand (the NF4 path's dense target weights)."""

    def __init__(self, files: list):
        from safetensors import safe_open

        self.where = {}
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                self.where.update({k: f for k in fh.keys()})

    def __call__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.where[key]), framework="pt") as fh:
            return fh.get_tensor(key)


def _tied_source(model: nn.Module, key: str) -> str:
    """The checkpoint key that holds ``key``'s values (a tied head reads the embedding)."""
    if key == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
        emb = model.get_input_embeddings()
        return next(n for n, m in model.named_modules() if m is emb) + ".weight"
    return key


class FSDP2Access(WeightAccess):
    """Owner-per-weight init over FSDP2 shards (module docstring, step 2). With ``read``
    (NF4 residuals) the dense weight is not a parameter at all: the owner reads it from the
    checkpoint, decomposes it and quantizes the residual; every rank receives the factors and
    the packed codes and keeps its rows of them."""

    def __init__(self, read=None):
        self.read = read
        self.max_full_numel = 0  # the largest weight gathered whole (tests check the bound)

    def run(self, layers, compute) -> None:
        rank, size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        for i, (name, layer) in enumerate(layers):
            owner = i % size
            with torch.no_grad():
                weight = layer.base_layer.weight
                if self.read is None:
                    W = compute_dtype(to_out_in(layer.base_layer, weight.full_tensor()))
                elif rank == owner:
                    raw = self.read(name + ".weight").to(weight.to_local().device)
                    W = compute_dtype(raw.t() if getattr(layer.base_layer, "svd_scale_was_conv1d", False) else raw)
                else:
                    W = None
                if W is not None:
                    self.max_full_numel = max(self.max_full_numel, W.numel())
                shapes = type(layer).shapes(layer.out_features, layer.in_features, layer.rank, layer.opts)
                values = compute(i, name, layer, W) if rank == owner else {}
                for t in sorted(shapes):
                    p = getattr(layer, t)
                    full = values.get(t)
                    dev = p.to_local().device
                    full = full.to(dev, p.dtype) if full is not None else torch.empty(shapes[t], dtype=p.dtype, device=dev)
                    if size > 1:
                        dist.broadcast(full, src=owner)
                    _write_local(p, full)
                full_state = {t: getattr(layer, t).full_tensor() for t in shapes}
                if self.read is None:
                    _write_local(weight, from_out_in(layer.base_layer, _residual(layer, W, full_state)))
                    continue
                base = layer.base_layer
                dev = base.weight.to_local().device
                if rank == owner:
                    payload = {k: t.to(dev) for k, t in base.payload(_residual(layer, W, full_state)).items()}
                else:
                    payload = base.empty_payload(dev)
                for k in sorted(payload):  # codes and scales (sharded parameters), offset (a buffer)
                    if size > 1:
                        dist.broadcast(payload[k], src=owner)
                    target = getattr(base, k)
                    if hasattr(target, "to_local"):
                        _write_local(target, payload[k])
                    else:
                        target.copy_(payload[k])


def _residual(layer, W: torch.Tensor, full_state: dict) -> torch.Tensor:
    """``W - removed`` from the tensors as stored (as ``inject.residual_of``)."""
    rem = type(layer).removed({k: v.to(W.dtype) for k, v in full_state.items()}, layer.opts)
    return W if rem is None else W - rem
