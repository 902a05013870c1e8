"""Everything that knows about sharding lives here (DeepSpeed ZeRO-3 today).

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

Bound: during init a rank holds at most G full weights (step 2) plus one fp32 copy of
its own weight and the SVD's workspace, on top of its shards; ``peak_gathered_numel``
records the largest number of gathered elements at once, and the tests check it. The
adapter tensors (``r * (out + in)`` per layer, ~1.5% of a 7B model at r=64) stay whole
on every rank until ``deepspeed.initialize`` partitions them.

Reading values for export (``full_value``) is a collective: every rank must call it.
"""
from __future__ import annotations

import contextlib
import copy
import json
from typing import Optional

import torch
import torch.distributed as dist

from .inject import WeightAccess, compute_dtype, load_tensors, to_out_in, write_residual


def is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def is_sharded(model: torch.nn.Module) -> bool:
    return any(is_zero3_param(p) for p in model.parameters())


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def full_value(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU, in the dtype training keeps it (collective for sharded ones).
    For a trainable with a separate fp32 master (ZeRO-3 bf16 mode) the master is read,
    so an exported adapter never holds 16-bit-rounded trainables."""
    if hasattr(p, "full_tensor"):  # FSDP2 DTensor
        return p.full_tensor().detach().cpu()
    if not is_zero3_param(p):
        return p.detach().cpu()
    import deepspeed

    if p.requires_grad and p.dtype != torch.float32 and getattr(p, "_z3_optimizer", None) is not None:
        return deepspeed.utils.safe_get_full_fp32_param(p).detach().cpu()
    with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
        return p.data.detach().cpu().clone()


class ZeRO3Access(WeightAccess):
    """Sharding-aware init under ZeRO-3 (see the module docstring)."""

    def __init__(self, max_group: int = 8, ds_config: Optional[dict] = None):
        self.max_group = max_group
        self.ds_config = ds_config
        self.peak_gathered_numel = 0

    def run(self, layers, compute) -> None:
        import deepspeed

        rank, size = world()
        group_size = max(1, min(size, self.max_group))
        for g in range(0, len(layers), group_size):
            group = layers[g:g + group_size]
            weights = [layer.base_layer.weight for _, layer in group]
            mine: dict[int, tuple] = {}
            with torch.no_grad(), deepspeed.zero.GatheredParameters(weights, modifier_rank=None):
                self.peak_gathered_numel = max(self.peak_gathered_numel, sum(w.numel() for w in weights))
                for j, (name, layer) in enumerate(group):
                    if (g + j) % size == rank:
                        W = compute_dtype(to_out_in(layer.base_layer, layer.base_layer.weight.detach())).clone()
                        mine[j] = (W, compute(g + j, name, layer, W))
            for j, (name, layer) in enumerate(group):
                owner = (g + j) % size
                with torch.no_grad():
                    if owner == rank:
                        load_tensors(layer, mine[j][1])
                    for _, p in sorted(layer.tensors().items()):
                        _broadcast(p, owner)
                    if getattr(layer, "quant", "none") == "nf4":
                        self._write_nf4(layer, mine.pop(j)[0] if owner == rank else None, owner, rank)
                        continue
                    with deepspeed.zero.GatheredParameters([layer.base_layer.weight], modifier_rank=owner):
                        if owner == rank:
                            write_residual(layer, mine.pop(j)[0])

    def _write_nf4(self, layer, W: Optional[torch.Tensor], owner: int, rank: int) -> None:
        """4-bit residual under ZeRO-3: the owner quantizes once and broadcasts the packed codes
        and the QuantState (DeepSpeed synchronizes parameters only, so every rank must receive
        the identical absmax/code itself); each rank wraps them in a Linear4bit whose packed
        bf16 weight is then partitioned like any bf16 tensor (``zero.Init(module=...)``,
        dtype bf16 so the codes are never cast). The old full-precision weight is dropped."""
        import deepspeed

        from .inject import residual_of
        from .quant import linear4bit_from_packed, payload_to_state, quantize_nf4, state_to_payload

        base = layer.base_layer
        payload = [None]
        if rank == owner:
            packed, state = quantize_nf4(residual_of(layer, W), layer.double_quant)
            payload = [state_to_payload(packed, state)]
        dist.broadcast_object_list(payload, src=owner)
        device = base.weight.device
        packed, state = payload_to_state(payload[0], device)
        lin = linear4bit_from_packed(base, (layer.out_features, layer.in_features), packed, state,
                                     layer.compute_dtype, layer.double_quant, getattr(base, "bias", None))
        deepspeed.zero.Init(module=lin, config_dict_or_path=self.ds_config, dtype=torch.bfloat16)
        layer.base_layer = lin


def _broadcast(p: torch.Tensor, src: int) -> None:
    if is_zero3_param(p):  # a ZeRO-3 parameter: broadcast through its gather
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=src):
            pass
        return
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(p.data, src=src)


def register_external(module: torch.nn.Module, params: list) -> None:
    """Under ZeRO-3, let ``module``'s forward read ``params`` owned by other modules
    (DeepSpeed gathers them around that forward). A no-op for unsharded models."""
    if not params or not any(is_zero3_param(p) for p in params):
        return
    import deepspeed

    for p in params:
        deepspeed.zero.register_external_parameter(module, p)


def settle(engine) -> None:
    """Wait for and release every ZeRO-3 parameter left in flight by forwards run outside a
    training step (held-out evaluation prefetches parameters it never consumes); without this
    the next gather -- e.g. the adapter export -- fails with "Cannot partition a param in flight"."""
    if hasattr(engine, "empty_partition_cache"):
        engine.empty_partition_cache()


def access_for(model: torch.nn.Module, ds_config: Optional[dict] = None) -> Optional[WeightAccess]:
    """The WeightAccess that fits how ``model``'s weights are stored (None: plain tensors)."""
    return ZeRO3Access(ds_config=ds_config) if is_sharded(model) else None


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
    from transformers.integrations import deepspeed as hf_ds

    cfg = copy.deepcopy(ds_config)  # pass the Trainer-processed config (batch sizes filled in)
    cfg.pop("torch_autocast", None)
    cfg["bf16"] = {"enabled": dtype == torch.bfloat16}
    cfg["fp16"] = {"enabled": False}
    previous = hf_ds._hf_deepspeed_config_weak_ref() if hf_ds._hf_deepspeed_config_weak_ref else None
    keep = HfDeepSpeedConfig(cfg)  # noqa: F841  (alive while loading: transformers holds a weakref)
    try:
        yield
    finally:
        if previous is not None:
            hf_ds.set_hf_deepspeed_config(previous)
        else:
            hf_ds.unset_hf_deepspeed_config()


# ----------------------------------------------------------------------------- resuming
def checkpoint_world_size(checkpoint_dir: str) -> Optional[int]:
    """How many ranks wrote the ZeRO checkpoint in ``checkpoint_dir`` (its ``latest`` tag's
    optimizer partitions), or None when it holds no DeepSpeed checkpoint."""
    from pathlib import Path

    latest = Path(checkpoint_dir) / "latest"
    if not latest.is_file():
        return None
    n = len(list((Path(checkpoint_dir) / latest.read_text().strip()).glob("*_optim_states.pt")))
    return n or None


def prepare_universal_resume(checkpoint_dir: str, world: int) -> Optional[int]:
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
    from pathlib import Path

    written = checkpoint_world_size(checkpoint_dir)
    if written is None or written == world:
        return None
    ckpt = Path(checkpoint_dir)
    tag = (ckpt / "latest").read_text().strip()
    target = ckpt / f"{tag}_universal"
    if dist.get_rank() == 0 and not (ckpt / "latest_universal").is_file():
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
    """(elements this rank stores, elements of the whole model) -- the partitioning check."""
    local = total = 0
    for p in model.parameters():
        if is_zero3_param(p):
            local += p.ds_tensor.numel()
            total += p.ds_numel
        else:
            local += p.numel()
            total += p.numel()
    return local, total
