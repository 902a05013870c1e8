"""One multi-rank ZeRO-3 job that runs every distributed check, so CI pays the launcher's
start-up once per world size. Launched by tests/test_zero3.py:

    DS_ACCELERATOR=cpu deepspeed --num_gpus N tests/dist/zero3_job.py --model DIR --out DIR [--train] [--resume] [--bf16]
        [--resume-from RUN_DIR]   # a run of another world size: resume its checkpoint-5 here

It only records facts (files under --out); the assertions live in the pytest file.
"""
import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import svd_scale  # noqa: E402
from svd_scale.config import load_config  # noqa: E402
from svd_scale.engines.zero3 import ZeRO3Access, load_partitioned, local_shard_numel, zero3_loading  # noqa: E402
from svd_scale.io import adapter_state_dict  # noqa: E402
from svd_scale.training import run  # noqa: E402

GLOBAL_BATCH = 6  # the Trainer runs' global batch at every world size (2 x 3 = 3 x 2), so checkpoints cross over
DS = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "zero_allow_untested_optimizer": True,
      "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}


def init_checks(model_dir: str, out: Path, rank: int, world: int) -> None:
    with zero3_loading(DS, torch.float32):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base_local, base_total = local_shard_numel(model)
    access = ZeRO3Access(max_group=2)
    svd_scale.apply(model, svd_scale.AdapterConfig(rank=8, svd="full"), access=access)
    state = adapter_state_dict(model)  # collective gather of every adapter tensor
    save_file(state, str(out / f"init_rank{rank}.safetensors"))
    engine, *_ = deepspeed.initialize(model=model, config=DS)
    local, total = local_shard_numel(model)
    x = torch.tensor([[5, 17, 300, 42, 7, 99, 1000, 3]])
    with torch.no_grad():
        logits = engine(input_ids=x).logits.float()
        plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()(input_ids=x).logits
    weights = [l.base_layer.weight.ds_numel for _, l in svd_scale.adapter_layers(model)]
    facts = {"world": world, "base_local": base_local, "base_total": base_total, "local": local, "total": total,
             "peak_gathered_numel": access.peak_gathered_numel, "max_group": 2, "max_weight_numel": max(weights),
             "model_weight_numel": sum(p.ds_numel for p in model.parameters()),
             "max_abs_logit_diff_vs_base": float((logits - plain).abs().max()),
             # U, V, sigma0: whole buffers outside ZeRO-3 (ZeRO3Access.adopt); sigma_delta, s: ZeRO-3 parameters
             "buffers": sorted(n for n, _ in next(svd_scale.adapter_layers(model))[1].named_buffers(recurse=False)),
             "zero_params": sorted(n for n, p in next(svd_scale.adapter_layers(model))[1].named_parameters(recurse=False)
                                   if hasattr(p, "ds_id")),
             "replicated_bytes": access.replicated_bytes}
    (out / f"init_rank{rank}.json").write_text(json.dumps(facts))
    engine.destroy()


METHOD_BATCH = torch.tensor([[5, 17, 300, 42, 7, 99, 1000, 3], [8, 12, 400, 41, 6, 77, 900, 2], [9, 13, 500, 40, 5, 66, 800, 4]])


def method_checks(model_dir: str, out: Path, rank: int, world: int) -> None:
    """Every method: sharded init, then one SGD step on one sequence per rank (eval mode, so
    SaLoRA's gates are deterministic) with the method's regularizer in the loss."""
    from svd_scale.methods import METHODS

    for method in sorted(METHODS):
        with zero3_loading(DS, torch.float32):
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        # the public call with no access argument: apply recognises the ZeRO-3 partitions itself
        svd_scale.apply(model, svd_scale.AdapterConfig(method=method, rank=4, svd="full"))
        init = adapter_state_dict(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=DS)
        engine.eval()
        x = METHOD_BATCH[rank:rank + 1]
        loss = engine(input_ids=x, labels=x).loss
        reg = svd_scale.regularization_loss(model)
        engine.backward(loss + reg if reg is not None else loss)
        engine.step()
        after = adapter_state_dict(model)
        save_file({**{"init." + k: v for k, v in init.items()}, **{"after." + k: v for k, v in after.items()}},
                  str(out / f"method_{method}_rank{rank}.safetensors"))
        (out / f"method_{method}_rank{rank}.json").write_text(json.dumps(
            {"loss": float(loss), "reg": None if reg is None else float(reg)}))
        engine.destroy()


def nf4_checks(model_dir: str, out: Path, rank: int, world: int, whole_gib: float = 0.0, tag: str = "nf4",
               streamed: bool = False) -> int:
    """NF4 residual under ZeRO-3: partitioned 4-bit codes (or, within ``whole_gib``, the first layers' codes whole
    on every rank, outside ZeRO-3), identical quant_state, one step. ``streamed``: built by ``load_partitioned``
    (the engine's loader for NF4: no dense target weight loaded; each owner reads its own from the file)."""
    from svd_scale.quant.nf4 import is_4bit

    # T=1: the pytest side compares with one process, and refinement re-quantizes T times, which
    # amplifies LAPACK's thread-count rounding (the job runs 1 thread) into flipped 4-bit codes
    cfg = svd_scale.AdapterConfig(rank=8, svd="full", quant="nf4", quant_iters=1)
    if streamed:
        model = load_partitioned(model_dir, cfg, DS, torch.float32, replicate_residual_gib=whole_gib)
        access = model.svd_scale_access
    else:
        with zero3_loading(DS, torch.float32):
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        access = ZeRO3Access(replicate_residual_gib=whole_gib)
        svd_scale.apply(model, cfg, access=access)
    layers = list(svd_scale.adapter_layers(model))
    states = {}
    local4 = total4 = 0
    whole = []
    for name, l in layers:
        w = l.base_layer.weight
        assert is_4bit(l.base_layer), name
        if hasattr(w, "ds_id"):
            local4 += w.ds_tensor.numel()
            total4 += w.ds_numel
        else:  # kept whole: a buffer that ZeRO-3 never sees
            assert "weight" in l.base_layer._buffers and not list(l.base_layer.parameters()), name
            whole.append(name)
            states[f"{name}.codes"] = w.data.view(torch.int16).cpu().clone()  # compared across ranks
        qs = w.quant_state
        states[f"{name}.absmax"] = qs.absmax.float().cpu()
        states[f"{name}.code"] = qs.code.float().cpu()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=DS)
    x = METHOD_BATCH[:2]
    with torch.no_grad():
        logits = engine(input_ids=x).logits.float()
    engine.train()
    xr = METHOD_BATCH[rank:rank + 1]
    loss = engine(input_ids=xr, labels=xr).loss
    engine.backward(loss)
    engine.step()
    after = adapter_state_dict(model)
    save_file({**states, **{"after." + k: v for k, v in after.items()}, "logits": logits},
              str(out / f"{tag}_rank{rank}.safetensors"))
    dtypes = sorted({str(l.base_layer.weight.dtype) for _, l in layers})
    (out / f"{tag}_rank{rank}.json").write_text(json.dumps({
        "local4": local4, "total4": total4, "loss": float(loss), "weight_dtypes": dtypes, "whole": whole,
        "names": [name for name, _ in layers],
        "layers": len(layers), "whole_bytes": access.whole_residual_bytes,
        "partitioned_layers": access.partitioned_residual_layers, "weights_read": access.weights_read,
        "owned": sum(1 for i in range(len(layers)) if i % world == rank), "peak_gathered": access.peak_gathered_numel,
        "head_is_embedding": model.get_output_embeddings().weight is model.get_input_embeddings().weight}))
    engine.destroy()
    return total4


def nf4_bf16_identity(model_dir: str, out: Path, rank: int) -> None:
    """A bf16 model from the fp32 checkpoint, both ways, every residual whole: ``load_partitioned`` must decompose
    each weight as loaded in the model's dtype, as ``apply`` on the dense load does (the SVD of the fp32 file's
    values would give other factors and codes)."""
    from svd_scale.io import adapter_state_dict

    cfg = svd_scale.AdapterConfig(rank=8, svd="full", quant="nf4", quant_iters=1)
    streamed = load_partitioned(model_dir, cfg, DS, torch.bfloat16, replicate_residual_gib=1000)
    with zero3_loading(DS, torch.bfloat16):
        dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    svd_scale.apply(dense, cfg, access=ZeRO3Access(replicate_residual_gib=1000))
    state = {}
    for tag, model in (("streamed", streamed), ("dense", dense)):
        state.update({f"{tag}.{k}": v for k, v in adapter_state_dict(model).items()})
        for name, l in svd_scale.adapter_layers(model):
            state[f"{tag}.{name}.codes"] = l.base_layer.weight.data.view(torch.int16).cpu().clone()
            state[f"{tag}.{name}.absmax"] = l.base_layer.weight.quant_state.absmax.float().cpu()
    save_file(state, str(out / f"nf4_bf16_identity_rank{rank}.safetensors"))


def nf4_resume(model_dir: str, out: Path, world: int) -> None:
    """Through the launch path: 4 steps with every NF4 residual kept whole (the GPU default's layout), a checkpoint
    at step 2, and a ``--resume`` from it asking for every residual partitioned: DeepSpeed's strict module load must
    take the checkpoint, the run must keep the residuals the checkpoint kept whole (DeepSpeed restores partitioned
    frozen tensors from the checkpoint's shards, and these have none), and the losses must be the uninterrupted
    run's. (The 16-bit run of :func:`train` resumes from partitioned to whole.)"""
    common = [f"model={model_dir}", "rank=8", "adapter.quant=nf4", "adapter.quant_iters=1", "train.eval_examples=0",
              "train.logging_steps=1", "train.max_length=48", f"train.batch_size={GLOBAL_BATCH // world}",
              "train.lr=1e-2", "train.max_steps=4", "train.save_steps=2", f"train.output_dir={out / 'nf4_train'}",
              "train.deepspeed=" + str(ROOT / "configs/deepspeed/zero3.json")]
    run(load_config(None, (*common, "train.zero3_replicate_residual_gib=100")))
    if dist.get_rank() == 0:
        shutil.copy(out / "nf4_train" / "metrics.json", out / "nf4_metrics_uninterrupted.json")
        shutil.rmtree(out / "nf4_train" / "checkpoint-4")
    dist.barrier()
    run(load_config(None, (*common, "train.zero3_replicate_residual_gib=0")), resume=True)


USER_STEPS = 3


def user_script(model_dir: str, out: Path, rank: int, world: int) -> None:
    """What a plugin user writes around svd_scale: transformers' non-Trainer DeepSpeed integration
    (an ``HfDeepSpeedConfig`` kept alive, so ``from_pretrained`` builds the model under
    ``zero.Init``), the public ``svd_scale.apply(model, cfg)`` with no access argument, their own
    ``deepspeed.initialize`` loop, then ``save_adapter``. Each rank trains on its own sequence."""
    from transformers.integrations import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(DS)  # noqa: F841  (transformers holds a weak reference)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
    svd_scale.apply(model, svd_scale.AdapterConfig(rank=8, svd="full"))
    init = adapter_state_dict(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=DS)
    x = METHOD_BATCH[rank:rank + 1]
    losses = []
    for _ in range(USER_STEPS):
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    svd_scale.save_adapter(model, str(out / "user_adapter"))  # collective; rank 0 writes
    save_file({"init." + k: v for k, v in init.items()}, str(out / f"user_init_rank{rank}.safetensors"))
    (out / f"user_rank{rank}.json").write_text(json.dumps({"partitioned_before_apply": partitioned, "losses": losses}))
    engine.destroy()
    if world == 2:
        user_script_with_speedups(model_dir, out, rank)
        layers_held_after_forward(model_dir, out, rank)


def _users_fast_engine(model_dir: str, ds: dict, compile: bool):
    """A plugin user's model set up as the README shows, with ``ds`` (``add_speed_defaults`` already merged):
    loaded partitioned, ``svd_scale.apply``, gradient checkpointing, ``speed_up_layers``, their own
    ``deepspeed.initialize``. Returns (engine, model, what speed_up_layers did)."""
    from transformers.integrations import HfDeepSpeedConfig

    from svd_scale.engines.zero3 import speed_up_layers

    keep = HfDeepSpeedConfig(ds)  # noqa: F841
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    svd_scale.apply(model, svd_scale.AdapterConfig(rank=8, svd="full"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # from_pretrained returns eval mode, where transformers skips checkpointing
    done = speed_up_layers(model, compile=compile)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    return engine, model, done


def layers_held_after_forward(model_dir: str, out: Path, rank: int) -> None:
    """How many decoder layers DeepSpeed still holds gathered at the end of the forward (checkpointing, leaf
    layers; the user's JSON partitions every weight), once with the engine's defaults and once with a
    prefetch bucket the user set: DeepSpeed's prefetcher marks what it passes in the backward's
    recomputation as needed again, so a large bucket keeps layers gathered into the backward."""
    import copy

    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from svd_scale.engines.zero3 import add_speed_defaults

    held = {}
    for name, user in (("defaults", {}), ("user_prefetch", {"stage3_prefetch_bucket_size": 10**8})):
        ds = copy.deepcopy(DS)  # persistence 0: every weight partitioned
        ds["zero_optimization"].update(user)
        added = add_speed_defaults(ds)
        engine, model, _ = _users_fast_engine(model_dir, ds, compile=False)
        layers = svd_scale.inject.decoder_layers(model)
        counts = []
        for _ in range(4):  # DeepSpeed records its trace in the first steps, then prefetches by it
            loss = engine(input_ids=METHOD_BATCH[rank:rank + 1], labels=METHOD_BATCH[rank:rank + 1]).loss
            counts.append(sum(any(p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_persist for p in b.parameters())
                              for b in layers))
            engine.backward(loss)
            engine.step()
        held[name] = {"added": sorted(added), "held_after_forward": counts, "layers": len(layers),
                      "partitioned": sum(not p.ds_persist for b in layers for p in b.parameters())}
        engine.destroy()
    (out / f"held_rank{rank}.json").write_text(json.dumps(held))


class RecompileReasons:
    """Collects why dynamo recompiled (its "recompiles" log) while the block runs, and how many graphs it built."""

    def __enter__(self):
        import logging

        self.reasons, self.graphs0 = [], torch._dynamo.utils.counters["stats"]["unique_graphs"]
        torch._logging.set_logs(recompiles=True)
        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.reasons.append(record.getMessage())
        logging.getLogger("torch._dynamo.guards.__recompiles").addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        import logging

        logging.getLogger("torch._dynamo.guards.__recompiles").removeHandler(self.handler)
        torch._logging.set_logs()
        self.graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - self.graphs0


def user_script_with_speedups(model_dir: str, out: Path, rank: int) -> None:
    """The same script with the engine's ZeRO-3 speed-ups, as the README shows a plugin user: the
    measured DeepSpeed settings merged into their config before loading, gradient checkpointing,
    then ``speed_up_layers`` (decoder layers as leaf modules, each layer's forward compiled)."""
    import copy

    from svd_scale.engines.zero3 import add_speed_defaults

    ds = copy.deepcopy(DS)
    ds["zero_optimization"].pop("stage3_param_persistence_threshold")  # the user left it unset: the default is added
    added = add_speed_defaults(ds, compile=True)
    engine, model, done = _users_fast_engine(model_dir, ds, compile=True)
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as Patched

    x = METHOD_BATCH[rank:rank + 1]
    losses = []
    with RecompileReasons() as dyn:
        for _ in range(USER_STEPS):
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
    compiled = [hasattr(b.forward, "_torchdynamo_orig_callable") for b in svd_scale.inject.decoder_layers(model)]
    (out / f"user_fast_rank{rank}.json").write_text(json.dumps({
        "losses": losses, "added": added, "done": done, "compiled": compiled, "graphs": dyn.graphs,
        "recompile_reasons": dyn.reasons, "torch_linear": torch.nn.functional.linear is Patched.linear_bk}))
    engine.destroy()


def train(model_dir: str, out: Path, world: int, resume: bool, bf16: bool, resume_from: str = None,
          only_resume: bool = False) -> None:
    common = [f"model={model_dir}", "rank=8", "train.eval_examples=0", "train.logging_steps=1", "train.max_length=48",
              f"train.batch_size={GLOBAL_BATCH // world}", "train.lr=1e-2", "train.deepspeed=" + str(ROOT / "configs/deepspeed/zero3.json")]
    run_dir = out / "train"
    # a tokenization cache of this job's own: the first run's first rank fills it, everyone else reads it
    os.environ["SVD_SCALE_CACHE"] = str(out / "cache")
    import svd_scale.data

    calls, encode = [0], svd_scale.data.encode
    svd_scale.data.encode = lambda *a, **k: (calls.__setitem__(0, calls[0] + 1), encode(*a, **k))[1]
    # U, V, sigma0 kept as ZeRO-3 parameters here (the layout of checkpoints before they became buffers); the
    # resumed run below does not set it and must follow the checkpoint
    run(load_config(None, (*common, "train.max_steps=10", "train.save_steps=5", f"train.output_dir={run_dir}",
                           *(("train.zero3_replicate_frozen_gib=0",) if resume and not only_resume else ()))))
    first = calls[0]
    if resume:  # stop after step 5: drop the later checkpoint, then --resume
        if dist.get_rank() == 0:
            shutil.copytree(run_dir / "adapter", out / "adapter_uninterrupted")
            shutil.copy(run_dir / "metrics.json", out / "metrics_uninterrupted.json")
            shutil.rmtree(run_dir / "checkpoint-10")
        dist.barrier()
        # ... and keeps every (16-bit) residual whole on every rank, where the checkpoint's run partitioned them
        run(load_config(None, (*common, "train.max_steps=10", "train.save_steps=5", f"train.output_dir={run_dir}",
                               *(("train.zero3_replicate_residual_gib=100",) if not only_resume else ()))), resume=True)
    svd_scale.data.encode = encode
    (out / f"tokenize_rank{dist.get_rank()}.json").write_text(json.dumps({"first_run": first, "resumed_run": calls[0] - first}))
    if only_resume:
        return
    if resume_from:  # another world size's checkpoint: converted to DeepSpeed's universal format and resumed
        if dist.get_rank() == 0:
            shutil.copytree(Path(resume_from) / "checkpoint-5", out / "reworld" / "checkpoint-5")
        dist.barrier()
        run(load_config(None, (*common, "train.max_steps=10", "train.save_steps=5", f"train.output_dir={out / 'reworld'}")),
            resume=True)
    # gradient checkpointing: the engine makes every decoder layer a ZeRO-3 leaf module
    run(load_config(None, (*common, "train.max_steps=4", "train.gradient_checkpointing=true",
                           f"train.output_dir={out / 'checkpointed'}")))
    if bf16:  # (world 2 only) the same run with each decoder layer's forward compiled, DeepSpeed's hooks eager
        import torch._dynamo

        kept = {}
        # why dynamo recompiled: a new sequence length is expected; a guard per layer (a weight's ds_id) is not
        with RecompileReasons() as dyn:
            run(load_config(None, (*common, "train.max_steps=4", "train.gradient_checkpointing=true", "train.compile=true",
                                   "train.eval_examples=24", f"train.output_dir={out / 'compiled'}")), keep=kept)
        from svd_scale.inject import decoder_layers

        layers = decoder_layers(kept["model"])
        (out / f"compiled_rank{dist.get_rank()}.json").write_text(json.dumps({
            "layers": len(layers), "forward_compiled": [hasattr(b.forward, "_torchdynamo_orig_callable") for b in layers],
            "graphs": dyn.graphs, "recompile_reasons": dyn.reasons}))
        del kept
    if bf16:  # (world 2 only) a chat file: template, assistant-only labels, eval loss through the Trainer
        import chat_data

        chat = out / "chat.jsonl"
        if dist.get_rank() == 0:
            chat_data.write(chat)
        dist.barrier()
        run(load_config(None, (*common, f"data={chat}", *chat_data.ARGS, f"train.output_dir={out / 'chat'}")))
        # rows of many lengths streamed (each rank reads the stream, keeps its share of each global batch) and
        # read whole, in order: the same batches
        varied = out / "varied.jsonl"
        if dist.get_rank() == 0:
            varied.write_text("\n".join(json.dumps({"prompt": f"Review {i}:" + " a very" * (i * 7 % 11) + " fine film.",
                                                    "completion": " positive" if i % 3 else " negative"}) for i in range(60)))
        dist.barrier()
        seq = ("train.max_steps=3", "train.logging_steps=1", "train.max_length=64", "train.hf_args={train_sampling_strategy: sequential}")
        run(load_config(None, (*common, f"data={varied}", *seq, "data_streaming=true", f"train.output_dir={out / 'chat_stream'}")))
        run(load_config(None, (*common, f"data={varied}", *seq, f"train.output_dir={out / 'chat_whole'}")))
    if bf16:
        # evaluates before and after training (ZeRO-3 forwards outside a step), then exports
        run(load_config(None, (*common, "train.max_steps=2", "train.precision=bf16", "train.eval_examples=96",
                               f"train.output_dir={out / 'bf16'}")))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--resume-from", default=None)
    ap.add_argument("--methods", action="store_true")
    ap.add_argument("--nf4", action="store_true")
    ap.add_argument("--tied-model", default=None, help="with --nf4: a model with tied embeddings, built while loading")
    ap.add_argument("--train-resume-only", action="store_true", help="only the 10-step run and its resume (two-node test)")
    ap.add_argument("--local_rank", type=int, default=-1)
    a = ap.parse_args()
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.train_resume_only:
        (out / f"node_rank{rank}.json").write_text(json.dumps({"rank": rank, "world": world,
                                                               "node_rank": os.environ.get("CROSS_RANK"),
                                                               "local_rank": os.environ.get("LOCAL_RANK")}))
        train(a.model, out, world, True, False, only_resume=True)
        dist.barrier()
        return
    init_checks(a.model, out, rank, world)
    user_script(a.model, out, rank, world)
    if a.methods:
        method_checks(a.model, out, rank, world)
    if a.nf4:
        total4 = nf4_checks(a.model, out, rank, world)
        # a budget of half the codes' bytes (bf16 storage, 2 bytes a value): the first layers whole, the rest partitioned
        nf4_checks(a.model, out, rank, world, whole_gib=total4 * 2 / 2 / 2**30, tag="nf4_whole")
        nf4_checks(a.model, out, rank, world, whole_gib=total4 * 2 / 2 / 2**30, tag="nf4_streamed", streamed=True)
        if a.tied_model:  # tied embeddings (SmolLM2, the quickstart's model): the head is the embedding, read once
            nf4_checks(a.tied_model, out, rank, world, tag="nf4_streamed_tied", streamed=True)
        nf4_bf16_identity(a.model, out, rank)
        nf4_resume(a.model, out, world)
    if a.train:
        train(a.model, out, world, a.resume, a.bf16, a.resume_from)
    dist.barrier()


if __name__ == "__main__":
    main()
