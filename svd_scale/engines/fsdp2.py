"""The PyTorch FSDP2 engine (``fully_shard``): sharded loading and sharding-aware adapter init.

The FSDP2 counterpart of ``engines/zero3.py``, for ``torchrun`` jobs:

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
reduction.

A model the user sharded with ``fully_shard`` themselves (their own script) also works with
``svd_scale.apply(model, cfg)``: :class:`FSDP2Access` recognises its DTensors. The adapter's new
parameters are created after sharding, so FSDP2 does not manage them: they stay whole and
identical on every rank (``r (out + in)`` values per layer) and their gradients are averaged over
ranks by a hook (:meth:`FSDP2Access.adopt`). A quantized residual must exist before sharding, so it
needs :func:`load_sharded`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..access import WeightAccess, register_access, world
from ..config import AdapterConfig
from ..inject import SVDSource, adapter_layers, decoder_layers, finish, wrap
from ..layer import from_out_in, math_dtype, to_out_in
from .base import Engine, load_tokenizer, model_dtype
from .checkpoint import (TensorReader, base_name, checkpoint_files, checkpoint_problem, expected_tensors,
                         meta_skeleton, tied_source)


def gather_for_regularizer(reg: nn.Module) -> None:
    """Let the method's extra loss (``svd_scale.losses.Regularizer``) read whole parameters.

    It runs after the model's forward, when FSDP2 has resharded every layer, so each
    parameter it reads is a shard. For the duration of its forward, each such DTensor is
    swapped for ``full_tensor()`` -- a differentiable all-gather whose backward hands every
    rank the gradient of its own rows. Every rank computes the same term from the same values,
    so that gradient is already the global one; FSDP2 adds its reduce-scattered task gradient
    to it (``foreach_reduce`` accumulates into an existing ``.grad``). The ZeRO-3 counterpart
    is the external-parameter registration in ``ZeRO3Access.wire_regularizer``."""
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
    """Whether ``model``'s parameters are FSDP2 DTensors."""
    return any(hasattr(p, "to_local") for p in model.parameters())


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


def shard(model: nn.Module, mp: Optional["object"] = None, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` each decoder layer, then the root (FSDP2's recommended granularity).
    ``reshard_after_forward=False`` is FSDP2's own ZeRO-2-like mode: a layer's gathered parameters
    stay until its backward, trading memory for one all-gather less per layer and step (7B NF4 on 4 H200s:
    +5-9% tokens/s compiled, 6.6-7.7 instead of 2.98 GiB per GPU; bench/results/zero3_fsdp2_70b_H200x4.md)."""
    from torch.distributed.fsdp import fully_shard

    kw = {"mp_policy": mp} if mp is not None else {}
    for block in decoder_layers(model):
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(model, **kw)
    return model


def mixed_precision(precision: str):
    """bf16: gather/compute in bf16, reduce gradients in fp32; fp32: no policy."""
    if precision != "bf16":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def load_sharded(path: str, cfg: AdapterConfig, dtype: torch.dtype = torch.float32, mp=None, seed: int = 0,
                 device: Optional[torch.device] = None, reshard_after_forward: bool = True) -> nn.Module:
    """Build ``path``'s model sharded over the current process group, with ``cfg``'s adapters
    initialized (module docstring), on ``device`` (default: this rank's GPU if there is one).
    Bad configurations fail before any weight is read. The same pipeline as ``svd_scale.apply``,
    with the sharding between wrapping and initialization. ``reshard_after_forward``: see :func:`shard`."""
    from transformers import AutoConfig

    files = checkpoint_files(path)
    model = meta_skeleton(AutoConfig.from_pretrained(path), dtype)  # parameters on meta, buffers (rotary tables) real
    source = SVDSource(cfg, seed)
    targets, ranks = source.plan(model)
    reader = TensorReader(files)
    problem = checkpoint_problem(reader, expected_tensors(model))  # keys and shapes from the headers, nothing read
    if problem:
        raise ValueError(f"{path}: {problem}")
    layers = wrap(model, targets, cfg, ranks)
    for _, layer in layers:  # a quantized residual takes its sharded form before sharding
        container = layer.storage.sharded_container(layer.base_layer, (layer.out_features, layer.in_features),
                                                    layer.compute_dtype)
        if container is not None:
            layer.base_layer = container
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    shard(model, mp, reshard_after_forward)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model.to_empty(device=device)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    _fill_from_checkpoint(model, files, path)
    filled_at_init = any(not layer.storage.in_place for _, layer in layers)
    access = FSDP2Access(reader if filled_at_init else None)
    finish(model, layers, cfg, source, access)
    model.svd_scale_fsdp_max_full_numel = access.max_full_numel
    return model


def _fill_from_checkpoint(model: nn.Module, files: list, path: str) -> None:
    """Each rank reads only its rows of every base tensor from the safetensors files. fully_shard +
    to_empty unties a tied output head (it gets its own shard), so the head reads the embedding's key."""
    from safetensors import safe_open

    adapter_params = {id(p) for _, layer in adapter_layers(model) for p in layer.tensors().values()}
    skip = {id(getattr(m, n)) for m in model.modules() for n in getattr(m, "filled_at_init", ()) if hasattr(m, n)}
    wanted: dict[str, list] = {}  # checkpoint key -> local parameters to fill
    for n, p in model.named_parameters():
        if id(p) not in adapter_params and id(p) not in skip:
            wanted.setdefault(tied_source(model, base_name(n)), []).append(p)
    with torch.no_grad():
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    for p in wanted.pop(key, []):
                        _write_local(p, _Rows(fh.get_slice(key)))
    if wanted:
        raise KeyError(f"fsdp2 load: {path} has no tensors for {sorted(wanted)[:5]}")


class _Rows:
    """Lets ``_write_local`` index a safetensors slice as if it were the whole tensor:
    only the requested rows are read from disk."""

    def __init__(self, sl):
        self.sl = sl

    def __getitem__(self, idx):
        return self.sl[idx]


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _set(p: torch.Tensor, full: torch.Tensor) -> None:
    if hasattr(p, "to_local"):
        _write_local(p, full)
    else:
        p.data.copy_(full.to(device=p.device, dtype=p.dtype))


def _broadcast(t: torch.Tensor, src: int) -> torch.Tensor:
    if world()[1] > 1:
        dist.broadcast(t, src=src)
    return t


@register_access
class FSDP2Access(WeightAccess):
    """Owner-per-weight init over FSDP2 shards (module docstring, step 2). With ``read``
    (a residual stored in another form, e.g. NF4) the dense weight is not a parameter at all: the
    owner reads it from the checkpoint, decomposes it and builds the stored form; every rank
    receives the factors and that form and keeps its rows of them."""

    def __init__(self, read=None):
        self.read = read
        self.max_full_numel = 0  # the largest weight gathered whole (tests check the bound)

    @classmethod
    def detect(cls, model: nn.Module) -> bool:
        return is_fsdp2(model)

    @classmethod
    def holds(cls, p: torch.Tensor) -> bool:
        return hasattr(p, "full_tensor")

    @staticmethod
    def full_value(p: torch.Tensor) -> torch.Tensor:
        return p.full_tensor().detach().cpu()

    @staticmethod
    def set_full_value(p: torch.Tensor, full: torch.Tensor) -> None:
        """Every rank holds ``full``, so writing its own rows needs no communication."""
        with torch.no_grad():
            _write_local(p, full.to(p.to_local().device))

    def check(self, model: nn.Module, cfg: AdapterConfig) -> None:
        if not cfg.storage().in_place:
            raise ValueError(f"adapter.quant={cfg.quant!r} on a model already sharded with fully_shard: the "
                             "quantized residual must exist before sharding; build the model with "
                             "svd_scale.engines.fsdp2.load_sharded(path, cfg) instead")

    def adopt(self, model: nn.Module, layers: list) -> None:
        """Adapters put on a model the user already sharded: their parameters are not FSDP2's, so
        they stay whole on every rank and each gradient is averaged over ranks as it is accumulated
        (what FSDP2's reduce-scatter does for the parameters it manages)."""
        def average(p: torch.Tensor) -> None:
            if p.grad is not None and world()[1] > 1:
                dist.all_reduce(p.grad)
                p.grad.div_(world()[1])

        for _, layer in layers:
            for p in layer.parameters(recurse=False):
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(average)

    def wire_regularizer(self, model: nn.Module, regularizer: nn.Module) -> None:
        gather_for_regularizer(regularizer)

    def _weight(self, name: str, layer, rank: int, owner: int) -> Optional[torch.Tensor]:
        """The full out x in weight in fp32 on the ranks that need it (all, or the owner alone)."""
        weight = layer.base_layer.weight
        if self.read is None:
            W = math_dtype(to_out_in(layer.base_layer, weight.full_tensor()))
        elif rank == owner:
            raw = self.read(name + ".weight").to(weight.to_local().device)
            W = math_dtype(raw.t() if getattr(layer.base_layer, "svd_scale_was_conv1d", False) else raw)
        else:
            return None
        self.max_full_numel = max(self.max_full_numel, W.numel())
        return W

    def run(self, layers, compute) -> None:
        rank, size = world()
        for i, (name, layer) in enumerate(layers):
            owner = i % size
            with torch.no_grad():
                W = self._weight(name, layer, rank, owner)
                values = compute(i, name, layer, W) if rank == owner else {}
                shapes = type(layer).shapes(layer.out_features, layer.in_features, layer.rank, layer.opts)
                for t in sorted(shapes):
                    p = getattr(layer, t)
                    dev = p.to_local().device if hasattr(p, "to_local") else p.device
                    full = values[t].to(dev, p.dtype) if t in values else torch.empty(shapes[t], dtype=p.dtype, device=dev)
                    _set(p, _broadcast(full, owner))
                stored = {t: _full(getattr(layer, t)) for t in shapes}
                if layer.storage.in_place:
                    res = type(layer).residual(W, stored, layer.opts)
                    _write_local(layer.base_layer.weight, from_out_in(layer.base_layer, res))
                else:
                    self._write_container(layer, W, stored, rank, owner)

    def _write_container(self, layer, W, stored: dict, rank: int, owner: int) -> None:
        """The owner fills the sharded container (e.g. NF4 codes and scales); every rank keeps its rows."""
        base = layer.base_layer
        dev = base.weight.to_local().device
        if rank == owner:
            payload = {k: t.to(dev) for k, t in base.payload(type(layer).residual(W, stored, layer.opts)).items()}
        else:
            payload = base.empty_payload(dev)
        for k in sorted(payload):  # sharded parameters, and small buffers
            target = getattr(base, k)
            _broadcast(payload[k], owner)
            if hasattr(target, "to_local"):
                _write_local(target, payload[k])
            else:
                target.copy_(payload[k])


class FSDP2Engine(Engine):
    """``torchrun ... launch/train.py`` with ``train.engine: fsdp2``: :func:`load_sharded` builds the
    model so that no rank holds it whole; the Trainer runs it as transformers' "sharded at load
    time" model, and the optimizer state is checkpointed through DCP."""

    name = "fsdp2"
    trainer_bf16 = False  # the MixedPrecisionPolicy set at sharding

    def trainer_arguments(self) -> dict:
        # transformers refuses to checkpoint a model sharded at load time unless told to save the
        # model only; the engine then saves the sharded optimizer itself (save_optimizer)
        return {"save_only_model": True}

    def load(self, args, adapt=None):
        from .. import builtin

        if adapt is not None:
            raise ValueError("engine fsdp2 builds its own sharded model; a custom adapt() needs engine single or deepspeed")
        path = builtin.resolve_model_path(self.cfg.model)
        model = load_sharded(path, self.cfg.adapter, model_dtype(self.cfg), mixed_precision(self.cfg.train.precision),
                             seed=self.cfg.train.seed)
        # transformers' flag for a model sharded at load time: its Trainer then neither wraps it in
        # DDP nor shards it again, and FSDP2 reduces the gradients itself.
        model._is_distributed_loading_by_transformers = True
        return model, load_tokenizer(path)

    def attach(self, trainer) -> None:
        trainer.args.save_only_model = False  # full checkpoints: optimizer (DCP), scheduler, RNG

    def _sharded(self, trainer) -> bool:
        return is_fsdp2(trainer.accelerator.unwrap_model(trainer.model))

    def save_optimizer(self, trainer, output_dir: str) -> bool:
        if not self._sharded(trainer):
            return False
        from transformers.trainer import SCHEDULER_NAME

        save_optimizer(trainer.accelerator.unwrap_model(trainer.model), trainer.optimizer, output_dir)
        if trainer.args.should_save:
            torch.save(trainer.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
        return True

    def load_optimizer(self, trainer, checkpoint: str) -> bool:
        if not self._sharded(trainer):
            return False
        from transformers.trainer import SCHEDULER_NAME

        load_optimizer(trainer.accelerator.unwrap_model(trainer.model), trainer.optimizer, checkpoint)
        trainer.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))
        return True
