"""The DeepSpeed ZeRO-3 engine: everything that knows about ZeRO-3 partitions lives here.

How a ZeRO-3 init works (``ZeRO3Access.run``), for a model built under ``zero.Init``
so that every rank holds only its shard of each weight:

1. Layers are taken in groups of ``G = min(world, max_group)``. Layer ``i`` is owned by
   rank ``i mod world``, so the SVDs of a group run on G ranks at once and the init
   time falls with world size.
2. The group's weights are gathered read-only (``GatheredParameters``, modifier_rank
   None); each owner copies its own weight to fp32 and decomposes it; the gather is
   released.
3. For each layer of the group: the owner's adapter tensors are broadcast to every
   rank (so all ranks hold identical factors and ``sigma``), then the weight is
   gathered again with ``modifier_rank=owner``; the owner writes ``W - removed`` into
   it in place (same shape and dtype, as GatheredParameters requires) and the exit
   broadcasts and re-partitions it.

4. Within a budget (``replicate_residual_gib``, default a quarter of the GPU), a layer's new residual is kept
   whole on every rank as buffers outside ZeRO-3 (:func:`keep_whole`) instead of being partitioned: the adapters
   train almost nothing, so ZeRO-3's per-step work was nearly all gathering these frozen codes.

With a residual stored in another form (NF4) and a safetensors checkpoint, :func:`load_partitioned` (what the
engine does) builds the model without ever loading the dense base: the skeleton on the meta device, the other
parameters read and partitioned one at a time, and in step 2 each owner reads its own weight from the file instead
of a gather (``ZeRO3Access(read=...)``). Loading the bf16 base first held every rank's shards of the whole model until
the last layer was quantized (70B on 2 GPUs: 89.18 GiB per GPU at load, 24.62 GiB this way).

Bound: during init a rank holds at most G full weights (step 2) plus one fp32 copy of
its own weight and the SVD's workspace, on top of its shards and the residuals kept whole; ``peak_gathered_numel``
records the largest number of gathered elements at once, and the tests check it. The
adapter tensors (``r * (out + in)`` per layer, ~1.5% of a 7B model at r=64) stay whole
on every rank until ``deepspeed.initialize`` partitions them.

Reading values for export (``full_value``) is a collective: every rank must call it.

:class:`ZeRO3Access` is registered with ``svd_scale.access``, so ``svd_scale.apply(model, cfg)``
on a model built under ``zero.Init`` (the user's own DeepSpeed script, HF ``Trainer(deepspeed=...)``,
accelerate) takes this path by itself. :class:`ZeRO3Engine` is what ``launch/train.py`` runs with
``train.deepspeed``: sharded loading, the DeepSpeed config, resuming under another world size.
"""
from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..access import WeightAccess, load_tensors, register_access, stored_residual, world
from ..layer import WHOLE_ATTR, math_dtype, to_out_in
from .base import Engine, load_model, load_tokenizer, model_dtype, say


def is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def _hf_ds_config() -> Optional[dict]:
    """The DeepSpeed config transformers holds while a ZeRO-3 model is built (HF Trainer, accelerate)."""
    try:
        from transformers.integrations.deepspeed import deepspeed_config

        return deepspeed_config()
    except ImportError:
        return None


@register_access
class ZeRO3Access(WeightAccess):
    """Sharding-aware init under ZeRO-3 (see the module docstring)."""

    def __init__(self, max_group: int = 8, ds_config: Optional[dict] = None, replicate_frozen_gib: float = 2.0,
                 replicate_residual_gib: Optional[float] = None, min_whole_layers: int = 0, read=None):
        self.max_group = max_group
        #: ``read(key)`` -> a whole checkpoint tensor, for targets whose dense weight was never loaded
        #: (:func:`load_partitioned`: its owner reads it from the file; nobody gathers it)
        self.read = read
        self.weights_read = 0  # dense target weights this rank read from the checkpoint (tests check: only its own)
        self.ds_config = ds_config if ds_config is not None else _hf_ds_config()
        self.replicate_frozen_gib = replicate_frozen_gib
        #: budget for residuals kept whole (:func:`keep_whole`); None: :func:`residual_budget_gib`'s default
        self.replicate_residual_gib = (residual_budget_gib(self.ds_config) if replicate_residual_gib is None
                                       else float(replicate_residual_gib))
        #: the first this many residuals are kept whole whatever the budget (a resumed checkpoint kept them so)
        self.min_whole_layers = min_whole_layers
        self.peak_gathered_numel = 0
        self.replicated_bytes = 0
        self.whole_residual_bytes = 0  # residuals kept whole on every rank (outside ZeRO-3)
        self.whole_residual_layers = 0
        self.partitioned_residual_layers = 0

    @classmethod
    def detect(cls, model: torch.nn.Module) -> bool:
        return any(is_zero3_param(p) for p in model.parameters())

    @classmethod
    def holds(cls, p: torch.Tensor) -> bool:
        return is_zero3_param(p)

    @staticmethod
    def full_value(p: torch.Tensor) -> torch.Tensor:
        """For a trainable with a separate fp32 master (ZeRO-3 bf16 mode) the master is read,
        so an exported adapter never holds 16-bit-rounded trainables. A collective."""
        import deepspeed

        if p.requires_grad and p.dtype != torch.float32 and getattr(p, "_z3_optimizer", None) is not None:
            return deepspeed.utils.safe_get_full_fp32_param(p).detach().cpu()
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.data.detach().cpu().clone()

    @staticmethod
    def set_full_value(p: torch.Tensor, full: torch.Tensor) -> None:
        import deepspeed

        with torch.no_grad(), deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.data.copy_(full.to(device=p.device, dtype=p.dtype))

    def adopt(self, model, layers) -> None:
        """Keep the adapters' frozen tensors (roles FACTOR and INIT: U, V, sigma0) whole on every rank, as
        non-persistent buffers that ZeRO-3 never sees, while they total at most ``replicate_frozen_gib``
        (7B shape, r=64: 0.3 GiB; 70B, r=64: 1.5 GiB; r=128: 3.1 GiB, over the default). DeepSpeed
        releases every parameter after each optimizer step and re-gathers each persistent one with its
        own collective -- 672 of them for a 7B model's U, V and sigma0, which never change
        (bench/results/zero3_options_H200x4.md). Done before the init, which then writes and broadcasts
        them like any whole tensor; the adapter file still saves them (``layer.tensors()`` reads buffers
        too). Over the budget they stay ZeRO-3 parameters."""
        self.replicated_bytes = replicate_frozen(layers, self.replicate_frozen_gib)

    def wire_regularizer(self, model, regularizer) -> None:
        """The regularizer reads parameters that other modules own: register them as its external
        parameters, so DeepSpeed gathers them around its forward and routes their gradients. The
        adapter's parameters are still whole here; ``deepspeed.initialize`` partitions these very
        objects later, so all of them are registered now."""
        import deepspeed

        for p in regularizer.read_parameters():
            deepspeed.zero.register_external_parameter(regularizer, p)

    def run(self, layers, compute) -> None:
        import deepspeed

        self.replicate_residual_gib = agreed_budget(self.replicate_residual_gib)
        rank, size = world()
        group_size = max(1, min(size, self.max_group))
        for g in range(0, len(layers), group_size):
            group = layers[g:g + group_size]
            weights = [layer.base_layer.weight for _, layer in group if not _unloaded(layer)]
            mine: dict[int, tuple] = {}
            with torch.no_grad(), deepspeed.zero.GatheredParameters(weights, modifier_rank=None):
                self.peak_gathered_numel = max(self.peak_gathered_numel, sum(w.numel() for w in weights))
                for j, (name, layer) in enumerate(group):
                    if (g + j) % size == rank:
                        W = math_dtype(to_out_in(layer.base_layer, self._dense(name, layer))).clone()
                        mine[j] = (W, compute(g + j, name, layer, W))
            for j, (name, layer) in enumerate(group):
                owner = (g + j) % size
                with torch.no_grad():
                    if owner == rank:
                        load_tensors(layer, mine[j][1])
                    for _, p in sorted(layer.tensors().items()):
                        _broadcast(p, owner)
                    W = mine.pop(j)[0] if owner == rank else None
                    if layer.storage.in_place:
                        with deepspeed.zero.GatheredParameters([layer.base_layer.weight], modifier_rank=owner):
                            if owner == rank:
                                layer.storage.build(layer.base_layer, stored_residual(layer, W), layer.compute_dtype)
                        if self._fits(layer.base_layer):
                            keep_whole(layer.base_layer)
                    else:
                        self._write_stored(layer, W, owner, rank)
                layer.base_layer.register_load_state_dict_pre_hook(_residual_from_init)

    def _dense(self, name: str, layer) -> torch.Tensor:
        """The owner's view of a target's dense weight: gathered, or -- never loaded -- read from the checkpoint."""
        if not _unloaded(layer):
            return layer.base_layer.weight.detach()
        if self.read is None:
            raise RuntimeError(f"{name}: its dense weight was never loaded and ZeRO3Access has no read=")
        self.weights_read += 1  # in the model's dtype, as a loaded weight would be: the same SVD as the dense path
        return self.read(name + ".weight").to(device=_adapter_device(layer), dtype=layer.base_layer.weight.dtype)

    def _write_stored(self, layer, W: Optional[torch.Tensor], owner: int, rank: int) -> None:
        """A residual in another storage (4-bit): the owner builds it once and broadcasts it whole
        (DeepSpeed synchronizes parameters only, so every rank must receive e.g. the identical
        QuantState itself); each rank rebuilds the module, whose parameters are then partitioned
        like any other (``zero.Init(module=...)``, in the storage's own dtype so packed codes are
        never cast). The old full-precision weight is dropped."""
        import deepspeed

        payload = [layer.storage.payload(stored_residual(layer, W)) if rank == owner else None]
        dist.broadcast_object_list(payload, src=owner)
        new = layer.storage.from_payload(layer.base_layer, (layer.out_features, layer.in_features), payload[0],
                                         layer.compute_dtype, device=_adapter_device(layer))
        if self._fits(new):
            keep_whole(new)
        else:
            deepspeed.zero.Init(module=new, config_dict_or_path=self.ds_config, dtype=layer.storage.shard_dtype)
        layer.base_layer = new

    def _fits(self, module: torch.nn.Module) -> bool:
        """Whether ``module``'s frozen residual is kept whole on every rank: the layers are taken in order, and
        kept while the residuals kept so far total at most ``replicate_residual_gib``; from the first one over it on,
        every residual is partitioned -- except that the first ``min_whole_layers`` are always kept. Every rank
        decides alike (sizes alone, and a budget agreed in :meth:`run`)."""
        nbytes = sum(_whole_numel(p) * p.element_size() for p in module.parameters())
        over = self.partitioned_residual_layers or self.whole_residual_bytes + nbytes > self.replicate_residual_gib * 2**30
        if over and self.whole_residual_layers >= self.min_whole_layers:
            self.partitioned_residual_layers += 1
            return False
        self.whole_residual_bytes += nbytes
        self.whole_residual_layers += 1
        return True


def _unloaded(layer) -> bool:
    """A target whose dense weight was never loaded (:func:`load_partitioned`: still on the meta device)."""
    return layer.base_layer.weight.is_meta


def _adapter_device(layer) -> torch.device:
    """Where a layer's adapter tensors (whole on every rank during the init) live: this rank's device."""
    return next(iter(layer.tensors().values())).device


def residual_budget_gib(ds_config: Optional[dict]) -> float:
    """The default budget for frozen residuals kept whole on every rank (``ZeRO3Access(replicate_residual_gib=None)``,
    ``train.zero3_replicate_residual_gib: null``): a quarter of this GPU's memory -- a 7B model's NF4 codes (3.0 GiB)
    on any GPU of 16 GB or more, not a 70B model's (about 32 GiB) on an 80 GB one, whose first layers then are; 0 on CPU
    (nothing measured there; CPU runs keep ZeRO-3's own layout) and when the DeepSpeed config offloads parameters
    (they would move from host memory into every GPU)."""
    offload = ((ds_config or {}).get("zero_optimization", {}).get("offload_param") or {}).get("device", "none")
    if offload not in (None, "none") or not torch.cuda.is_available() or not _accelerator_is_cuda():
        return 0.0
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 4 / 2**30


def _accelerator_is_cuda() -> bool:
    """DeepSpeed's accelerator, not merely a visible GPU: ``DS_ACCELERATOR=cpu`` on a GPU host runs ZeRO-3 on CPU."""
    try:
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        return False
    return get_accelerator().device_name() == "cuda"


def agreed_budget(gib: float) -> float:
    """The smallest of the ranks' budgets: ranks on GPUs of different sizes (or MIG slices) must still keep the
    same residuals whole, or their modules -- and the gathers that build them -- would differ. A collective."""
    if world()[1] == 1:
        return gib
    from deepspeed.accelerator import get_accelerator

    t = torch.tensor([float(gib)], dtype=torch.float64, device=get_accelerator().current_device_name())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t.item())


def _whole_numel(p: torch.Tensor) -> int:
    return p.ds_numel if is_zero3_param(p) else p.numel()


def keep_whole(module: torch.nn.Module) -> None:
    """Turn a residual module's frozen parameters into non-persistent buffers holding their whole value, on every
    rank: ZeRO-3 then never partitions, gathers or releases them, and DeepSpeed's per-layer fetch of a decoder layer
    finds nothing to gather (the adapter trains 1.4 M values of a 7B model; nearly all of ZeRO-3's per-step work was
    fetching these frozen codes, bench/results/perf_notes.md). Each rank holds the same value: the owner's residual,
    broadcast by the init. Not in checkpoints (non-persistent): ``--resume`` recomputes it, as for a partitioned one."""
    kept = [name for name, p in module._parameters.items() if p is not None]
    for name in kept:
        p = module._parameters[name]
        _to_buffer(module, name, _gathered(p) if is_zero3_param(p) else p)  # the object itself: a Params4bit keeps its QuantState
    setattr(module, WHOLE_ATTR, tuple(kept))  # parameter_counts still counts them


def _gathered(p: torch.Tensor) -> torch.Tensor:
    """A whole copy of a ZeRO-3 parameter, on its device (a collective: every rank calls it)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
        return p.data.clone()


def _to_buffer(module: torch.nn.Module, name: str, whole: torch.Tensor) -> None:
    """Replace parameter ``name`` by a non-persistent buffer holding ``whole``: ZeRO-3 never partitions, gathers or
    re-gathers it again, and DeepSpeed's checkpoints do not hold it."""
    del module._parameters[name]
    module.register_buffer(name, whole, persistent=False)


def _residual_from_init(module, state_dict, prefix, *_):
    """``load_state_dict`` pre-hook of each residual module under ZeRO-3 (``--resume``). DeepSpeed's checkpoint holds
    the module state as it was saved -- partitioned residuals as empty tensors, nothing for the codes of residuals
    kept whole, and for every 4-bit one bitsandbytes' quant-state entries (``weight.absmax``, ...) that no module
    accepts back -- and transformers loads it strictly. The init has already recomputed the residual (the same base,
    the same decomposition: the factors are compared, :func:`check_resumed_factors`), so what the checkpoint holds
    for it is replaced by the module's own tensors; DeepSpeed then restores the partitioned ones from the
    checkpoint's own shards, which is why a resumed run keeps at least the residuals its checkpoint kept whole
    (``ZeRO3Engine.prepare_resume``)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]
    own = {**module._parameters, **{n: b for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set}}
    state_dict.update({prefix + n: t for n, t in own.items() if t is not None})


def replicate_frozen(layers, budget_gib: float) -> int:
    """Turn the layers' FACTOR and INIT parameters into non-persistent buffers holding their whole value
    if together they take at most ``budget_gib``; returns the bytes so kept (0: none)."""
    from ..layer import Role

    frozen = [(layer, n, p) for _, layer in layers for n, p in layer.tensors((Role.FACTOR, Role.INIT)).items()]
    nbytes = sum(_whole_numel(p) * p.element_size() for *_, p in frozen)
    if not frozen or nbytes > budget_gib * 2**30:
        return 0
    for layer, name, p in frozen:
        _to_buffer(layer, name, _gathered(p) if is_zero3_param(p) else p.detach())
    return nbytes


def check_resumed_factors(layers, state_file: str) -> int:
    """A resumed run recomputes the buffered U, V, sigma0 by the init (DeepSpeed's checkpoint does not hold
    buffers); compare them with the values the checkpoint's run trained with (its adapter state), and
    refuse a mismatch -- another decomposition would put the trained sigma on other vectors, silently.
    Returns how many tensors were compared."""
    from safetensors import safe_open

    from ..layer import Role

    compared = 0
    with safe_open(state_file, framework="pt") as f:
        keys = set(f.keys())
        for name, layer in layers:
            for n, t in layer.tensors((Role.FACTOR, Role.INIT)).items():
                key = f"{name}.{n}"
                if is_zero3_param(t) or key not in keys:
                    continue
                saved, now = f.get_tensor(key).double(), t.detach().double().cpu()
                err = (saved - now).abs().max().item()
                if err > 1e-3 * max(saved.abs().max().item(), 1e-12):
                    raise RuntimeError(f"--resume: {key} recomputed by the init differs from the checkpoint's by {err:.3g} "
                                       f"({state_file}); the base model or the decomposition changed since it was written")
                compared += 1
    return compared


def _broadcast(p: torch.Tensor, src: int) -> None:
    if is_zero3_param(p):  # a ZeRO-3 parameter: broadcast through its gather
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=src):
            pass
        return
    if world()[1] > 1:
        dist.broadcast(p.data, src=src)


def settle(engine) -> None:
    """Wait for and release every ZeRO-3 parameter left in flight by forwards run outside a
    training step (held-out evaluation prefetches parameters it never consumes); without this
    the next gather -- e.g. the adapter export -- fails with "Cannot partition a param in flight"."""
    if hasattr(engine, "empty_partition_cache"):
        engine.empty_partition_cache()


# ----------------------------------------------------------------------------- loading
def read_ds_config(path_or_dict) -> dict:
    if isinstance(path_or_dict, dict):
        return copy.deepcopy(path_or_dict)
    with open(path_or_dict) as f:
        return json.load(f)


@contextlib.contextmanager
def zero3_loading(ds_config: dict, dtype: torch.dtype):
    """Make ``from_pretrained`` build the model partitioned (``zero.Init``) in ``dtype``.

    transformers wraps model creation in ``zero.Init(config)`` when an HfDeepSpeedConfig
    is alive, and zero.Init takes its dtype from the config's bf16/fp16 sections. We
    train in DeepSpeed's ``torch_autocast`` mode (bf16 compute, parameters keep their
    own dtypes, so the trainables stay fp32 in the module *and* the optimizer), where
    bf16 is off -- so for loading only, a copy of the config with ``bf16`` on makes
    the frozen base arrive in bf16 instead of fp32 (half the memory)."""
    from transformers.integrations import HfDeepSpeedConfig

    cfg = copy.deepcopy(ds_config)  # pass the Trainer-processed config (batch sizes filled in)
    cfg.pop("torch_autocast", None)
    cfg["bf16"] = {"enabled": dtype == torch.bfloat16}
    cfg["fp16"] = {"enabled": False}
    with _hf_zero3_config(HfDeepSpeedConfig, cfg):
        yield


@contextlib.contextmanager
def _hf_zero3_config(make=None, cfg=None):
    """The DeepSpeed config transformers sees while the block runs (``make(cfg)``; none without ``make``: a model
    is then not built under ``zero.Init``), and the one alive before it afterwards (the Trainer's)."""
    from transformers.integrations import deepspeed as hf_ds

    previous = hf_ds._hf_deepspeed_config_weak_ref() if hf_ds._hf_deepspeed_config_weak_ref else None
    try:
        hf_ds.unset_hf_deepspeed_config()
        keep = make(cfg) if make is not None else None  # noqa: F841  (alive in the block: transformers holds a weakref)
        yield
    finally:
        if previous is not None:
            hf_ds.set_hf_deepspeed_config(previous)
        else:
            hf_ds.unset_hf_deepspeed_config()


def load_partitioned(path: str, cfg, ds_config: dict, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                     **access_options) -> torch.nn.Module:
    """Build ``path``'s model partitioned under ZeRO-3 with ``cfg``'s adapters initialized, for a residual stored
    in another form (``adapter.quant: nf4``), without ever building the dense base -- not even partitioned.

    Loading the base in bf16 under ``zero.Init`` and quantizing afterwards holds every rank's bf16 shards of the
    whole model until the last layer is adapted: at 70B on 2 GPUs the load + adapt peak was 89.18 GiB per GPU,
    24.62 GiB this way (bench/results/zero3_load_70b_H200x2.md). As ``fsdp2.load_sharded`` does: the skeleton is
    built on the meta device and wrapped; the parameters no adapter replaces (embeddings, norms, head, untargeted
    layers) are read from the checkpoint and partitioned one at a time; each target's dense weight is read by its
    owner rank alone at init (``ZeRO3Access(read=...)``), decomposed, quantized and broadcast as NF4. Checkpoint keys
    and shapes are checked from the files' headers before any tensor is read. ``access_options`` go to
    :class:`ZeRO3Access` (the residual budget, ...). A collective: every rank calls it."""
    from transformers import AutoConfig

    from .checkpoint import TensorReader, checkpoint_files

    reader = TensorReader(checkpoint_files(path))
    return build_partitioned(meta_skeleton(AutoConfig.from_pretrained(path), dtype), reader, cfg, ds_config, seed,
                             where=path, **access_options)


def meta_skeleton(config, dtype: torch.dtype) -> torch.nn.Module:
    """``checkpoint.meta_skeleton``, also while a ZeRO-3 config is alive (the Trainer's), under which transformers
    would build the model under ``zero.Init``. A tied head is tied here (``from_config`` leaves it a separate
    parameter until weights are loaded), so it is read and partitioned once, as the embedding."""
    from . import checkpoint

    with _hf_zero3_config():
        model = checkpoint.meta_skeleton(config, dtype)
    model.tie_weights()
    return model


def build_partitioned(model: torch.nn.Module, read, cfg, ds_config: dict, seed: int = 0, where: str = "the checkpoint",
                      **access_options) -> torch.nn.Module:
    """:func:`load_partitioned` on a skeleton already built on the meta device (:func:`meta_skeleton`), with ``read``
    giving each checkpoint tensor whole (``checkpoint.TensorReader``; the benchmarks draw random ones)."""
    from deepspeed.accelerator import get_accelerator

    from ..inject import SVDSource, finish, wrap
    from .checkpoint import base_name, checkpoint_problem, expected_tensors, tied_source

    if cfg.storage().in_place:
        raise ValueError(f"load_partitioned builds a residual stored in another form (adapter.quant=nf4); "
                         f"adapter.quant={cfg.quant!r} keeps it in the base weight: load the base with zero.Init")
    source = SVDSource(cfg, seed)
    targets, ranks = source.plan(model)  # names and ranks checked before any tensor is read
    problem = checkpoint_problem(read, expected_tensors(model))
    if problem:
        raise ValueError(f"{where}: {problem}")
    access = ZeRO3Access(ds_config=ds_config, read=read, **access_options)
    unloaded = {id(m.weight) for _, m in targets}  # read by their owners at init, never parameters
    params = _holders(model, skip=unloaded)
    layers = wrap(model, targets, cfg, ranks)
    device = torch.device(get_accelerator().current_device_name())
    with torch.no_grad():
        for _, layer in layers:  # whole on every rank until deepspeed.initialize, as after apply()
            for p in layer.tensors().values():
                p.data = p.data.to(device)
        for m in model.modules():
            for n, b in m._buffers.items():
                if b is not None:
                    m._buffers[n] = b.to(device)
        for p, holders, name in params.values():
            _partition_from(read(tied_source(model, base_name(name))), p, holders, ds_config, device)
    access.adopt(model, layers)
    model = finish(model, layers, cfg, source, access)
    model.svd_scale_access = access  # what the init kept whole, how much it read (the engine's log, tests)
    return model


def _holders(model: torch.nn.Module, skip: set) -> dict:
    """id(parameter) -> (parameter, [(module, attribute)], first full name): a tied parameter is one entry."""
    out: dict = {}
    for mname, m in model.named_modules():
        for n, p in m._parameters.items():
            if p is not None and id(p) not in skip:
                out.setdefault(id(p), (p, [], f"{mname}.{n}" if mname else n))[1].append((m, n))
    return out


def _partition_from(full: torch.Tensor, meta: torch.nn.Parameter, holders: list, ds_config: dict, device) -> None:
    """Put ``full`` (a whole checkpoint tensor) where the meta parameter was, in every module that holds it, and
    partition it (``zero.Init(module=...)`` partitions the parameters of the module it is given: here a holder of
    this one). Every rank read the same file; DeepSpeed keeps rank 0's bytes."""
    import deepspeed

    p = torch.nn.Parameter(full.to(device=device, dtype=meta.dtype), requires_grad=meta.requires_grad)
    for m, n in holders:
        m._parameters[n] = p
    holder = torch.nn.Module()
    holder.register_parameter("p", p)
    deepspeed.zero.Init(module=holder, config_dict_or_path=ds_config, dtype=meta.dtype)


# ----------------------------------------------------------------------------- resuming
def checkpoint_world_size(checkpoint_dir: str) -> Optional[int]:
    """How many ranks wrote the ZeRO checkpoint in ``checkpoint_dir`` (its ``latest`` tag's
    optimizer partitions), or None when it holds no DeepSpeed checkpoint."""
    latest = Path(checkpoint_dir) / "latest"
    if not latest.is_file():
        return None
    n = len(list((Path(checkpoint_dir) / latest.read_text().strip()).glob("*_optim_states.pt")))
    return n or None


def prepare_universal_resume(checkpoint_dir: str, world_size: int) -> Optional[int]:
    """Make a ZeRO-3 checkpoint written by another number of ranks loadable by this run.

    ZeRO partitions the optimizer state by world size, so DeepSpeed cannot load a checkpoint of
    N ranks on M (it fails deep inside with a tensor-size mismatch). DeepSpeed's *universal*
    checkpoint (``deepspeed.checkpoint.ds_to_universal``; Lian et al., "Universal Checkpointing",
    arXiv 2406.18820) stores each parameter's fp32 value and Adam moments whole, and any world size
    loads it with ``checkpoint.load_universal``. Rank 0 converts once, beside the original (a
    temporary folder, then rename, so an interrupted conversion leaves nothing half-written); the
    frozen base and residual are not in it and need not be: the init recomputes them identically.
    Multi-node: the checkpoint must sit on storage every rank reads, as DeepSpeed's own loading needs.
    Returns the number of ranks that wrote it when the run must load the universal copy, else None
    (every rank calls this; a barrier)."""
    import shutil
    from argparse import Namespace

    written = checkpoint_world_size(checkpoint_dir)
    if written is None or written == world_size:
        return None
    ckpt = Path(checkpoint_dir)
    tag = (ckpt / "latest").read_text().strip()
    target = ckpt / f"{tag}_universal"
    if world()[0] == 0 and not (ckpt / "latest_universal").is_file():
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        tmp = ckpt / f".{tag}_universal.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        ds_to_universal(Namespace(input_folder=str(ckpt / tag), output_folder=str(tmp / target.name),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                  strict=True, inject_missing_state=False))
        shutil.rmtree(target, ignore_errors=True)
        (tmp / target.name).rename(target)
        shutil.rmtree(tmp)
        part = ckpt / "latest_universal.tmp"
        part.write_text(target.name)
        part.rename(ckpt / "latest_universal")
    dist.barrier()
    return written


def local_shard_numel(model: torch.nn.Module) -> tuple[int, int]:
    """(elements this rank stores, elements of the whole model) -- the partitioning check. Residuals kept whole
    (:func:`keep_whole`) count in both, at their stored size."""
    local = total = 0
    for p in model.parameters():
        if is_zero3_param(p):
            local += p.ds_tensor.numel()
            total += p.ds_numel
        else:
            local += p.numel()
            total += p.numel()
    for m in model.modules():
        whole = sum(getattr(m, n).numel() for n in getattr(m, WHOLE_ATTR, ()))
        local, total = local + whole, total + whole
    return local, total


# ----------------------------------------------------------------------------- the engine
#: ZeRO-3 options added to a DeepSpeed config that does not set them. With decoder-layer leaf modules
#: (:func:`set_leaf_modules`) a prefetch bucket of 2e8 was the largest speed-up measured eager (+39-41%,
#: bench/results/zero3_settings_H200x4.md), but it is off: DeepSpeed's prefetcher walks its trace from the
#: end of the forward into the backward's recomputation and marks each gathered parameter it passes as
#: needed again, so nothing it passed is released. With the 2e8 bucket a rank held the 4-bit codes of ~27
#: of 32 layers at the end of the forward (3.0 GiB; train peak 6.56 GiB per GPU at N=4 vs 5.52 in one
#: process); with prefetch and the reuse window at 0 it holds one layer at a time: peak 3.23 GiB, tokens/s
#: 6-19% lower, compiled (one 4 x H200 host, 7B shape, bench/results/zero3_memory_H200x4.md). A 70B
#: model's codes (35 GB) would not fit gathered. A JSON that sets ``stage3_prefetch_bucket_size`` keeps it:
#: trade memory for speed there. Persistence 1e6 keeps sigma, s and the norms whole. These peaks are with every
#: residual partitioned; residuals kept whole (``ZeRO3Access.replicate_residual_gib``, the GPU default) are not
#: fetched at all.
SPEED_DEFAULTS = {"stage3_prefetch_bucket_size": 0, "stage3_max_reuse_distance": 0,
                  "stage3_max_live_parameters": 2_000_000_000, "stage3_param_persistence_threshold": 1_000_000}


def add_speed_defaults(ds: dict, compile: bool = False) -> dict:
    """Fill in :data:`SPEED_DEFAULTS` where a stage-3 config leaves them unset (a value the user
    wrote, ``"auto"`` included, is kept); returns what was added. With ``compile`` (decoder layers to
    be compiled, :func:`speed_up_layers`) also ``memory_efficient_linear: false``: DeepSpeed's Python
    ``F.linear`` wrapper makes dynamo guard on each weight's ``ds_id``, so every layer recompiled
    (measured with PEFT's LoRA on 4 H200s: the limit of 8 hit, the other layers eager). Call it before
    the model is built: ``zero.Init`` installs that wrapper."""
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") != 3:
        return {}
    added = {k: v for k, v in SPEED_DEFAULTS.items() if k not in zero}
    if compile and "memory_efficient_linear" not in zero:
        added["memory_efficient_linear"] = False
    zero.update(added)
    return added


def speed_up_layers(model, compile: bool = True) -> dict:
    """The ZeRO-3 engine's per-layer speed-ups, for a plugin user's own DeepSpeed script too (after
    ``svd_scale.apply``, before ``deepspeed.initialize``; the DeepSpeed config through
    :func:`add_speed_defaults` first). Each decoder layer becomes a leaf module (:func:`set_leaf_modules`)
    and, with ``compile``, its ``forward`` is compiled (:func:`compile_forwards`). Needs gradient
    checkpointing on the model (see :func:`set_leaf_modules`); refused without it."""
    if not getattr(model, "is_gradient_checkpointing", False):
        raise ValueError("speed_up_layers needs gradient checkpointing on the model (model.gradient_checkpointing_enable()): "
                         "without it DeepSpeed's leaf modules hand backward released parameters")
    done = {"leaf_modules": set_leaf_modules(model)}
    if compile:
        done["compiled_layers"] = compile_forwards(model)
    return done


def compile_forwards(model) -> int:
    """Under ZeRO-3, each decoder layer's ``forward`` is compiled, not ``Module.__call__``: DeepSpeed's
    fetch and release hooks run around ``forward`` and stay eager (Python bookkeeping that dynamo does
    not trace), and with the layers as leaf modules (:func:`set_leaf_modules`) nothing inside a layer is
    hooked. One compiled graph serves every layer. Measured on 4 H200s, 7B, N=4, with the 2e8 prefetch
    shipped then: 1.33-1.53x the eager tokens/s per GPU (bench/results/zero3_compile_H200x4.md). Returns how
    many layers."""
    from .base import compile_blocks

    restore_torch_linear()
    return compile_blocks(model, forward_only=True)


def restore_torch_linear() -> None:
    """Put torch's own ``F.linear`` back where an earlier ``zero.Init`` or ``deepspeed.initialize`` in this
    process (with ``memory_efficient_linear`` on) replaced it: DeepSpeed never resets it, and compiled
    layers would recompile per layer through it (:func:`add_speed_defaults`)."""
    import torch
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as Patched

    original = getattr(Patched, "linear_bk", None)
    if original is not None and torch.nn.functional.linear is not original:
        torch.nn.functional.linear = original


def set_leaf_modules(model) -> str:
    """Make each decoder layer a ZeRO-3 leaf: its parameters are fetched and released together, with
    one hook pair per layer instead of one per submodule (the adapter adds modules to every layer).
    Only with gradient checkpointing, whose recomputation runs each layer's forward (and so the
    fetch) again inside backward: without it DeepSpeed 0.19's leaf mode hands backward released
    (empty) parameters ("size of tensor a (0) must match ...", seen on CPU with 2 ranks)."""
    import deepspeed

    from ..inject import decoder_layers

    cls = type(decoder_layers(model)[0])
    deepspeed.utils.set_z3_leaf_modules(model, [cls])
    return cls.__name__


def run_config(path_or_dict, precision: str) -> dict:
    """The user's DeepSpeed JSON with the run's precision applied: bf16 runs in DeepSpeed's
    ``torch_autocast`` mode (parameters keep their dtypes: frozen base bf16, trainables
    fp32 in the module and the optimizer); fp32 runs turn autocast off. ``"enabled": "auto"`` (the
    Hugging Face / LLaMA-Factory convention: follow the trainer) is read as ``train.precision``."""
    ds = read_ds_config(path_or_dict)
    for key in ("bf16", "fp16"):
        if ds.get(key, {}).get("enabled") is True:
            raise ValueError(f"{path_or_dict}: '{key}.enabled' would cast the fp32 trainables to 16 bit; "
                             "svd_scale uses 'torch_autocast' instead (set train.precision=bf16)")
        ds.pop(key, None)
    ds["torch_autocast"] = {"enabled": precision == "bf16", "dtype": "bfloat16"}
    return ds


class ZeRO3Engine(Engine):
    """``deepspeed launch/train.py ... train.deepspeed=<json>``: the base is built partitioned
    (``zero.Init`` through transformers), the adapters are initialized by :class:`ZeRO3Access`, and
    transformers' Trainer drives DeepSpeed."""

    name = "deepspeed"
    trainer_bf16 = False  # torch_autocast in the DeepSpeed config
    resume_layout: Optional[str] = None  # how the checkpoint being resumed kept U, V, sigma0 (prepare_resume)
    resume_whole_layers: int = 0  # how many residuals the checkpoint being resumed kept whole (prepare_resume)
    resume_checkpoint: Optional[str] = None
    stage3: bool = False  # ZeRO stage 3 in the run's DeepSpeed config (setup)
    compile_wanted: bool = False  # train.compile resolved and allowed here (setup)

    def setup(self) -> None:
        import deepspeed

        self.ds = run_config(self.cfg.train.deepspeed, self.cfg.train.precision)
        zero = self.ds.get("zero_optimization", {})
        self.stage3 = zero.get("stage") == 3
        self.compile_wanted = self.cfg.train.compiles() and self._compile_allowed(zero)
        added = add_speed_defaults(self.ds, compile=self.compile_wanted)
        from datetime import timedelta

        # deepspeed.comm must be up before zero.Init reads the world size
        deepspeed.init_distributed(timeout=timedelta(minutes=self.cfg.train.timeout_minutes))
        if added:
            say("ZeRO-3: added " + ", ".join(f"{k}={v}" if isinstance(v, bool) else f"{k}={v:g}" for k, v in added.items())
                + " (set them in your DeepSpeed JSON to choose otherwise)")

    def replicate_gib(self) -> float:
        """``train.zero3_replicate_frozen_gib``, its default (2 GiB; 0 when parameters are offloaded: there they
        would move from host memory into every GPU), or 0 for a checkpoint that kept them as ZeRO-3 parameters."""
        if self.resume_layout == "parameters":
            return 0.0
        if self.cfg.train.zero3_replicate_frozen_gib is not None:
            return self.cfg.train.zero3_replicate_frozen_gib
        offload = self.ds.get("zero_optimization", {}).get("offload_param", {}).get("device", "none")
        return 0.0 if offload not in (None, "none") else 2.0

    def _compile_allowed(self, zero: dict) -> bool:
        """Where ``train.compile`` can apply under DeepSpeed: ZeRO stage 3, gradient checkpointing (the layers
        become leaf modules, so nothing inside a compiled layer is hooked), and not ``memory_efficient_linear:
        true`` in the user's JSON (its wrapper recompiles every layer). Otherwise ``true`` is refused before
        anything loads and ``auto`` runs eager, saying why."""
        why = ("ZeRO stage 3" if not self.stage3 else
               "train.gradient_checkpointing=true" if not self.cfg.train.gradient_checkpointing else
               "memory_efficient_linear unset or false in the DeepSpeed JSON" if zero.get("memory_efficient_linear") is True
               else None)
        if why is None:
            return True
        if self.cfg.train.compile == "true":
            raise ValueError(f"train.compile=true under DeepSpeed needs {why} (each decoder layer's forward is compiled "
                             "with DeepSpeed's hooks outside it); set train.compile=false to run eager")
        if self.cfg.train.compiles():
            self.notes["compile"] = f"eager (compiling under DeepSpeed needs {why})"
            say(f"train.compile=auto: eager (compiling under DeepSpeed needs {why})")
        return False

    def compiles(self) -> bool:
        """After :meth:`load`: only where the decoder layers became leaf modules (not for a custom ``adapt``)."""
        return self.compile_wanted and "zero3_leaf_modules" in self.notes

    def compile_blocks(self, model) -> int:
        """Each layer's ``forward`` only (:func:`compile_forwards`): DeepSpeed's hooks stay eager."""
        return compile_forwards(model)

    def marker_fields(self) -> dict:
        return {"zero3_frozen": "buffers" if self.notes.get("zero3_replicated_frozen_mib") else "parameters",
                "zero3_whole_residual_layers": self.notes.get("zero3_whole_residual_layers", 0)}

    def prepare_resume(self, checkpoint: str) -> None:
        self.resume_checkpoint = checkpoint
        marker = Path(checkpoint) / "svd_scale_checkpoint.json"  # training.MARKER (engines do not import training)
        fields = json.loads(marker.read_text()) if marker.is_file() else {}
        layout = fields.get("zero3_frozen", "parameters")
        # DeepSpeed restores every partitioned frozen tensor from the checkpoint's own shards, and a residual the
        # checkpoint kept whole has none there: keep at least those whole (more is fine, their shards are unused)
        self.resume_whole_layers = int(fields.get("zero3_whole_residual_layers", 0))
        if self.resume_whole_layers:
            say(f"{checkpoint} kept the first {self.resume_whole_layers} residuals whole on every rank: this run keeps "
                "at least those whole")
        if layout == "parameters":  # written before they became buffers, or with the budget at 0: load them as saved
            self.resume_layout = layout
            say(f"{checkpoint} keeps the adapters' U, V, sigma0 as ZeRO-3 parameters: this run does too")
        written = prepare_universal_resume(checkpoint, world()[1])
        if written:
            say(f"{checkpoint} was written by {written} ranks, this run has {world()[1]}: "
                "resuming from its DeepSpeed universal copy")
            self.ds.setdefault("checkpoint", {})["load_universal"] = True

    def trainer_arguments(self) -> dict:
        return {"deepspeed": self.ds}

    def load(self, args, adapt=None):
        from .. import builtin
        from ..inject import apply

        ds = args.hf_deepspeed_config.config  # the Trainer-processed config (batch sizes filled in)
        stage3 = self.stage3
        tok = load_tokenizer(builtin.resolve_model_path(self.cfg.model))
        options = dict(replicate_frozen_gib=self.replicate_gib(),
                       replicate_residual_gib=self.cfg.train.zero3_replicate_residual_gib,
                       min_whole_layers=self.resume_whole_layers)
        built = self._while_loading() if stage3 and not adapt else None
        if built is not None:
            skeleton, reader, where = built
            model = build_partitioned(skeleton, reader, self.cfg.adapter, ds, seed=self.cfg.train.seed, where=where,
                                      **options)
            access = model.svd_scale_access
        else:
            with zero3_loading(ds, model_dtype(self.cfg)) if stage3 else contextlib.nullcontext():
                model = load_model(self.cfg)  # under ZeRO-3: built partitioned
            if adapt:
                return adapt(model), tok
            access = ZeRO3Access(ds_config=ds, **options) if stage3 else None
            model = apply(model, self.cfg.adapter, seed=self.cfg.train.seed, access=access)
        if access is not None:
            self._say_residual_layout(access)
        if access is not None and access.replicated_bytes:
            self.notes["zero3_replicated_frozen_mib"] = round(access.replicated_bytes / 2**20, 1)
            if self.resume_checkpoint:
                from ..inject import adapter_layers

                state = str(Path(self.resume_checkpoint) / "training_state.safetensors")  # training.RESUME_STATE
                self.notes["zero3_resume_factors_checked"] = check_resumed_factors(list(adapter_layers(model)), state)
            say(f"ZeRO-3: the adapters' frozen U, V and sigma0 ({access.replicated_bytes / 2**20:.1f} MiB) are kept "
                "whole on every rank, outside ZeRO-3 (fewer tensors to release and re-gather each step)")
        if stage3 and self.cfg.train.gradient_checkpointing:
            self.notes["zero3_leaf_modules"] = set_leaf_modules(model)
            say(f"ZeRO-3: every {self.notes['zero3_leaf_modules']} is a leaf module (fetched whole, one hook pair)")
        return model, tok

    def _while_loading(self) -> Optional[tuple]:
        """``(skeleton, reader, folder)`` when the model can be built while loading (:func:`build_partitioned`: a
        quantized residual, a local safetensors checkpoint whose keys and shapes are the model's); otherwise None,
        and the dense base is loaded partitioned first, saying why and what that costs."""
        from transformers import AutoConfig

        from .. import builtin
        from .checkpoint import TensorReader, checkpoint_files, checkpoint_problem, expected_tensors

        if self.cfg.adapter.storage().in_place:
            return None
        try:
            where = builtin.local_model_dir(self.cfg.model)
            reader = TensorReader(checkpoint_files(where))
        except (OSError, ValueError):  # no local safetensors folder (a missing one: FileNotFoundError, an OSError)
            where, why = None, "no local safetensors checkpoint"
        if where is not None:
            skeleton = meta_skeleton(AutoConfig.from_pretrained(where), model_dtype(self.cfg))
            why = checkpoint_problem(reader, expected_tensors(skeleton))
            if why is None:
                self.notes["zero3_load"] = "partitioned while loading: no dense target weight loaded"
                say(f"ZeRO-3: building the {self.cfg.adapter.quant} residuals while loading {where}: each target's "
                    "dense weight is read by the rank that decomposes it, never loaded partitioned")
                return skeleton, reader, where
            why = f"{why}; from_pretrained renames legacy keys, this loader does not"
        self.notes["zero3_load"] = f"dense base loaded partitioned first ({why})"
        say(f"ZeRO-3: the dense base is loaded partitioned first and quantized layer by layer ({why}): its bf16 shards "
            "count against each GPU until the last layer is adapted")
        return None

    def _say_residual_layout(self, access: "ZeRO3Access") -> None:
        whole, parted = access.whole_residual_layers, access.partitioned_residual_layers
        self.notes["zero3_whole_residual_layers"] = whole
        self.notes["zero3_whole_residual_mib"] = round(access.whole_residual_bytes / 2**20, 3)
        budget = (f"train.zero3_replicate_residual_gib={access.replicate_residual_gib:g}"
                  if self.cfg.train.zero3_replicate_residual_gib is not None else
                  f"a budget of {access.replicate_residual_gib:.1f} GiB: a quarter of the GPU's memory, "
                  "0 on CPU or with parameter offload; train.zero3_replicate_residual_gib sets it")
        say(f"ZeRO-3: the frozen residual of {whole} of {whole + parted} adapted layers "
            f"({access.whole_residual_bytes / 2**20:,.1f} MiB) is kept whole on every rank, outside ZeRO-3"
            + (f", the other {parted} partitioned" if parted and whole else "") + f" ({budget})")

    def settle(self, trainer) -> None:
        settle(trainer.model_wrapped)
