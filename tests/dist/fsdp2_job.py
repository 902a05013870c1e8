"""One multi-rank FSDP2 job (gloo, CPU) that runs every FSDP2 check, so CI pays torchrun's
start-up once per world size. Launched by tests/test_fsdp2.py:

    torchrun --nproc_per_node N tests/dist/fsdp2_job.py --model DIR --out DIR [--resume-from DIR]

Each rank also builds the single-process reference itself (the model is tiny), so every
comparison is against plain, unsharded svd_scale on the same weights. It only records
facts (rank<k>.json); the assertions live in the pytest file.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import svd_scale  # noqa: E402
from svd_scale.engines import fsdp2 as fsdp  # noqa: E402
from svd_scale.io import adapter_state_dict, save_adapter  # noqa: E402

GLOBAL_BATCH, SEQ, STEPS = 6, 12, 5
LR = {"svd_scale": 1e-2, "pissa": 1e-3, "sorsa": 1e-3, "kasa": 1e-3, "salora": 1e-3}
METHODS = tuple(LR)  # sorsa and kasa add a regularizer over whole (gathered) parameters
# weights large enough that a wrong regularizer gradient (lost, or counted once per rank) moves the losses
OPTS = {"sorsa": {"gamma": 0.5}, "kasa": {"beta": 0.1, "gamma": 0.5}, "salora": {"gamma": 0.5, "budget": 0.25}}
# shared with tests/test_fsdp2.py's single-process reference; the launch path's global batch is
# LAUNCH_BATCH for every world size (2 x 3 = 3 x 2), so a checkpoint of one resumes under the other
LAUNCH_BATCH = 6
RUN_ARGS = ("rank=8", "train.eval_examples=24", "train.logging_steps=1", "train.max_length=48", "train.lr=1e-2",
            "train.max_steps=10")


def batches(vocab: int):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(STEPS)]


def train(model, data, lr, rank=0, world=1):
    model.train()
    torch.manual_seed(1234)  # SaLoRA samples its gates: the same draws in every process
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for x in data:
        mine = x.chunk(world)[rank]  # equal token counts per rank: mean of means == global mean
        loss = model(input_ids=mine, labels=mine).loss
        reg = svd_scale.regularization_loss(model)  # the same term on every rank, from whole parameters
        if reg is not None:
            loss = loss + reg
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t = loss.detach().clone()
        if world > 1:
            dist.all_reduce(t)
        losses.append(t.item() / world)
    return losses, opt


def local_numel(model) -> tuple[int, int]:
    loc = tot = 0
    for n, p in model.named_parameters():
        if not n.endswith("weight") or not hasattr(p, "to_local"):
            continue
        loc += p.to_local().numel()
        tot += p.numel()
    return loc, tot


def method_checks(a, facts: dict, data: list, base_logits, rank: int, world: int, out: Path) -> None:
    """Every method through fsdp.load_sharded against plain svd_scale on the same weights."""
    x0 = data[0]
    base = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    for method in METHODS:
        cfg = svd_scale.AdapterConfig(method=method, rank=4, svd="full", **OPTS.get(method, {}))
        ref = svd_scale.apply(AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32), cfg)
        ref_init = adapter_state_dict(ref)
        model = fsdp.load_sharded(a.model, cfg)
        f = facts[method] = {}
        f["local_numel"], f["total_numel"] = local_numel(model)
        f["max_full_numel"] = model.svd_scale_fsdp_max_full_numel
        f["largest_weight"] = max(m.weight.numel() for _, m in svd_scale.inject.find_targets(base, "all-linear"))
        got_init = adapter_state_dict(model)  # collective
        f["factor_err"] = max((got_init[k] - v).abs().max().item() for k, v in ref_init.items())
        with torch.no_grad():
            logits = model(input_ids=x0).logits
            f["init_logits_err"] = (logits - base_logits).abs().max().item()  # kasa: truncated W by design
            f["init_vs_one_process"] = (logits - ref(input_ids=x0).logits).abs().max().item()
        f["ref_losses"], _ = train(ref, data, LR[method])
        f["losses"], _ = train(model, data, LR[method], rank, world)
        reg = svd_scale.regularization_loss(ref)
        f["reg_share"] = 0.0 if reg is None else reg.item() / f["ref_losses"][-1]
        save_adapter(model, str(out / f"adapter_{method}"))  # collective; rank 0 writes
        dist.barrier()
        saved = load_file(str(out / f"adapter_{method}" / "svd_scale_adapter.safetensors"))
        want = adapter_state_dict(ref)
        f["export_err"] = max((saved[k] - v).abs().max().item() for k, v in want.items())
        f["export_dtypes"] = sorted({str(saved[k].dtype) for k in saved if k.endswith(("sigma", "sigma_delta", "scale"))})
        f["export_keys_equal"] = sorted(saved) == sorted(want)


def reshard_checks(a, facts: dict, data: list, rank: int, world: int) -> None:
    """``reshard_after_forward=False`` (gathered layers kept until their backward) trains alike."""
    cfg = svd_scale.AdapterConfig(method="svd_scale", rank=4, svd="full", **OPTS.get("svd_scale", {}))
    for keep in (False, True):  # between forward and backward, is the first decoder layer still gathered?
        model = fsdp.load_sharded(a.model, cfg, reshard_after_forward=not keep)
        loss = model(input_ids=data[0], labels=data[0]).loss
        layer = svd_scale.inject.decoder_layers(model)[0]
        facts[f"gathered_after_forward_{keep}"] = not any(hasattr(p, "to_local") for p in layer.parameters())
        loss.backward()
    model.zero_grad(set_to_none=True)
    facts["kept_gathered_losses"], _ = train(model, data, LR["svd_scale"], rank, world)


def bf16_checks(a, facts: dict, data: list, rank: int, world: int) -> None:
    """bf16 mixed precision: trainables and optimizer state stay fp32 in the shards."""
    cfg = svd_scale.AdapterConfig(rank=4, svd="full")
    model = fsdp.load_sharded(a.model, cfg, dtype=torch.bfloat16, mp=fsdp.mixed_precision("bf16"))
    losses, opt = train(model, data, LR["svd_scale"], rank, world)
    facts["bf16"] = {
        "losses": losses,
        "trainable": sorted({str(p.to_local().dtype) for p in model.parameters() if p.requires_grad}),
        "frozen": sorted({str(p.to_local().dtype) for p in model.parameters() if not p.requires_grad}),
        "optimizer": sorted({str(v.dtype) for s in opt.state.values() for k, v in s.items() if k != "step"}),
    }


def nf4_checks(a, facts: dict, data: list, base_logits, rank: int, world: int) -> None:
    """NF4 residual (and with double quantization): codes and block scales sharded, equal to one
    process's bitsandbytes Linear4bit model."""
    x0 = data[0]
    biased = _biased_copy(a.model, Path(a.out) / "biased_model")  # biases are read from the checkpoint, not the init
    for key, dq, path in (("nf4", False, a.model), ("nf4_dq", True, a.model), ("nf4_bias", False, biased)):
        cfg = svd_scale.AdapterConfig(rank=4, svd="full", quant="nf4", quant_iters=1, double_quant=dq)  # T=1: test_zero3's note
        ref = svd_scale.apply(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), cfg)
        model = fsdp.load_sharded(path, cfg)
        with torch.no_grad():
            ref_logits, got_logits = ref(input_ids=x0).logits, model(input_ids=x0).logits
        loc4 = tot4 = 0
        for _, layer in svd_scale.inject.adapter_layers(model):
            for p in layer.base_layer.parameters():
                loc4, tot4 = loc4 + p.to_local().numel(), tot4 + p.numel()
        ref_losses, _ = train(ref, data[:2], LR["svd_scale"])
        losses, _ = train(model, data[:2], LR["svd_scale"], rank, world)
        facts[key] = {"local4": loc4, "total4": tot4, "max_full_numel": model.svd_scale_fsdp_max_full_numel,
                      "logits_err": (got_logits - ref_logits).abs().max().item(),
                      "logits_vs_base": (got_logits - base_logits).abs().max().item(),
                      "losses": losses, "ref_losses": ref_losses,
                      "base_layer": type(next(svd_scale.inject.adapter_layers(model))[1].base_layer).__name__}


def _biased_copy(model_dir: str, out: Path) -> str:
    """The job's model with biases on every projection (rank 0 writes it)."""
    from transformers import AutoConfig

    if dist.get_rank() == 0:
        cfg = AutoConfig.from_pretrained(model_dir)
        cfg.attention_bias = cfg.mlp_bias = True
        torch.manual_seed(3)
        model = AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(".bias"):
                    p.uniform_(-0.5, 0.5)
        model.save_pretrained(out)
    dist.barrier()
    return str(out)


def user_script(a, facts: dict, data: list, rank: int, world: int) -> None:
    """What a plugin user writes: their own ``fully_shard`` of every decoder layer and the root,
    then the public ``svd_scale.apply(model, cfg)`` with no access argument, then their own loop."""
    from torch.distributed.fsdp import fully_shard

    cfg = svd_scale.AdapterConfig(rank=4, svd="full")
    ref = svd_scale.apply(AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32), cfg)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    svd_scale.apply(model, cfg)
    got, want = adapter_state_dict(model), adapter_state_dict(ref)
    f = facts["user"] = {"factor_err": max((got[k] - v).abs().max().item() for k, v in want.items())}
    f["base_sharded"] = all(hasattr(layer.base_layer.weight, "to_local") for _, layer in svd_scale.adapter_layers(model))
    f["ref_losses"], _ = train(ref, data, LR["svd_scale"])
    f["losses"], _ = train(model, data, LR["svd_scale"], rank, world)
    after, ref_after = adapter_state_dict(model), adapter_state_dict(ref)
    f["trained_err"] = max((after[k] - v).abs().max().item() for k, v in ref_after.items())
    f["moved"] = max((ref_after[k] - want[k]).abs().max().item() for k in want)
    try:
        sharded = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
        fully_shard(sharded)
        svd_scale.apply(sharded, svd_scale.AdapterConfig(rank=4, quant="nf4"))
        f["nf4_refused"] = ""
    except ValueError as e:
        f["nf4_refused"] = str(e)


def launch_path_checks(a, facts: dict, rank: int, world: int, out: Path) -> None:
    """svd_scale.training.run with engine fsdp2 (Trainer, data sharding, eval, export), --resume, and
    train.compile."""
    from svd_scale.config import load_config
    from svd_scale.training import run

    launch = (f"model={a.model}", *RUN_ARGS, f"train.batch_size={LAUNCH_BATCH // world}", "train.engine=fsdp2",
              "train.save_steps=5")
    run(load_config(None, (*launch, f"train.output_dir={out / 'train'}")))
    # --resume: a copy of that run stopped after step 5 (its later checkpoint dropped) continues
    # from checkpoint-5: adapter, sharded AdamW state (DCP), scheduler and RNG restored
    drop = {"checkpoint-10", "adapter", "metrics.json", "run_config.json"}  # what steps 6-10 wrote
    if rank == 0:
        shutil.copytree(out / "train", out / "resume", ignore=lambda d, names: drop & set(names) if d == str(out / "train") else ())
    dist.barrier()
    run(load_config(None, (*launch, f"train.output_dir={out / 'resume'}")), resume=True)
    if a.resume_from:  # the same, from a checkpoint another world size wrote (DCP reshards the AdamW state)
        if rank == 0:
            src = Path(a.resume_from)
            shutil.copytree(src, out / "reworld", ignore=lambda d, names: drop & set(names) if d == str(src) else ())
        dist.barrier()
        run(load_config(None, (*launch, f"train.output_dir={out / 'reworld'}")), resume=True)
    if world == 2:  # a chat file: template, assistant-only labels, eval loss through the Trainer
        import chat_data

        chat = out / "chat.jsonl"
        if rank == 0:
            chat_data.write(chat)
        dist.barrier()
        run(load_config(None, (*launch, f"data={chat}", *chat_data.ARGS, f"train.output_dir={out / 'chat'}")))
    # train.compile: the same run with every (FSDP2-sharded) decoder layer under torch.compile
    kept: dict = {}
    run(load_config(None, (*launch, "train.compile=true", f"train.output_dir={out / 'compiled'}")), keep=kept)
    facts["compiled_blocks"] = all(getattr(b, "_compiled_call_impl", None) is not None
                                   for b in svd_scale.inject.decoder_layers(kept["model"]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume-from", default=None, help="another world size's launch-path run dir to resume")
    a = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(a.out)
    facts = {"world": world}
    base = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    data = batches(base.config.vocab_size)
    with torch.no_grad():
        base_logits = base(input_ids=data[0]).logits
    method_checks(a, facts, data, base_logits, rank, world, out)
    bf16_checks(a, facts, data, rank, world)
    reshard_checks(a, facts, data, rank, world)
    nf4_checks(a, facts, data, base_logits, rank, world)
    user_script(a, facts, data, rank, world)
    try:  # bad input is refused before any weight is read
        fsdp.load_sharded(a.model, svd_scale.AdapterConfig(rank=100_000))
        facts["bad_rank_refused"] = ""
    except ValueError as e:
        facts["bad_rank_refused"] = str(e)
    launch_path_checks(a, facts, rank, world, out)
    (out / f"rank{rank}.json").write_text(json.dumps(facts, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
