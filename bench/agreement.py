#!/usr/bin/env python
"""Agreement across world sizes (issue 9, run 1): the same 20 training steps on 1 GPU and on N GPUs
under FSDP2 give the same losses and the same exported adapter.

    torchrun --nproc_per_node 1 bench/agreement.py --out runs/agree1
    torchrun --nproc_per_node N bench/agreement.py --out runs/agreeN
    deepspeed --num_gpus N bench/agreement.py --engine deepspeed --out runs/z3N
    python bench/agreement.py --compare runs/agree1 runs/agreeN [--write FILE]

Model: a Llama with random weights written once as a safetensors checkpoint (hidden 1024, 8 layers;
shapes decide the arithmetic). svd_scale r=64, fp32 (no mixed precision, so differences are only the
reduction order of the collectives), AdamW lr 1e-2, global batch 8 x 256 tokens split over the ranks.
"""
import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GLOBAL_BATCH, SEQ, STEPS = 8, 256, 20


def _zero3(ckpt: Path, cfg, world: int):
    """The model under DeepSpeed ZeRO-3: loaded partitioned, adapters by ZeRO3Access, engine."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    import svd_scale
    from svd_scale.engines.zero3 import ZeRO3Access, zero3_loading

    ds = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "zero_allow_untested_optimizer": True,
          "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "gradient_accumulation_steps": 1}
    with zero3_loading(ds, torch.float32):
        model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    svd_scale.apply(model, cfg, access=ZeRO3Access(ds_config=ds))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    return model, engine


def train(out: Path, ckpt: Path, engine_name: str = "fsdp2") -> None:
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    import svd_scale
    from svd_scale.engines import fsdp2 as fsdp
    from svd_scale.io import save_adapter

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if engine_name == "deepspeed":
        import deepspeed

        deepspeed.init_distributed()
    else:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0 and not (ckpt / "config.json").is_file():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                                     num_key_value_heads=16, vocab_size=32000)).save_pretrained(ckpt)
    dist.barrier()
    cfg = svd_scale.AdapterConfig(rank=64, svd="full")
    if engine_name == "deepspeed":
        model, engine = _zero3(ckpt, cfg, world)
        dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    else:
        model = engine = fsdp.load_sharded(str(ckpt), cfg, torch.float32)
        dev = next(model.parameters()).device
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        x = torch.randint(0, 32000, (GLOBAL_BATCH, SEQ), generator=g).chunk(world)[rank].to(dev)
        loss = engine(input_ids=x, labels=x).loss
        if engine_name == "deepspeed":
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(t.item() / world)
    save_adapter(model, str(out / "adapter"))
    if rank == 0:
        name = torch.cuda.get_device_name() if cuda else "CPU"
        (out / "losses.json").write_text(json.dumps({"world": world, "device": name, "engine": engine_name, "losses": losses}))
    dist.destroy_process_group()


def compare(a: Path, b: Path, write: str = None) -> None:
    from safetensors.torch import load_file

    la, lb = (json.loads((p / "losses.json").read_text()) for p in (a, b))
    ta, tb = torch.tensor(la["losses"]), torch.tensor(lb["losses"])
    rel = ((ta - tb).abs() / ta.abs()).max().item()
    wa, wb = (load_file(str(p / "adapter" / "svd_scale_adapter.safetensors")) for p in (a, b))
    adapter = max(((wa[k] - wb[k]).abs().max() / wa[k].abs().max().clamp_min(1e-12)).item() for k in wa)
    lines = [f"# Agreement: {la.get('engine', 'fsdp2')} on {la['world']} vs {lb.get('engine', 'fsdp2')} on {lb['world']} GPU(s), {STEPS} steps", "",
             f"- device: {la['device']}; date {datetime.date.today()}",
             "- commands: `torchrun --nproc_per_node W bench/agreement.py [--engine deepspeed] --out DIR` for each run, then "
             "`python bench/agreement.py --compare DIR1 DIR2`", "",
             f"| step | loss (A: {la.get('engine')} x{la['world']}) | loss (B: {lb.get('engine')} x{lb['world']}) |", "|---|---|---|"]
    lines += [f"| {i + 1} | {x:.6f} | {y:.6f} |" for i, (x, y) in enumerate(zip(la["losses"], lb["losses"])) if i % 4 == 0 or i == STEPS - 1]
    lines += ["", f"- max relative loss difference over {STEPS} steps: {rel:.2e}",
              f"- exported adapters: max |difference| / max |value| over all tensors: {adapter:.2e}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if write:
        Path(write).write_text(text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--ckpt", default="/tmp/svd_scale_agreement_llama")
    ap.add_argument("--compare", nargs=2)
    ap.add_argument("--write")
    ap.add_argument("--engine", default="fsdp2", choices=["fsdp2", "deepspeed"])
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.compare:
        return compare(Path(a.compare[0]), Path(a.compare[1]), a.write)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    train(Path(a.out), Path(a.ckpt), a.engine)


if __name__ == "__main__":
    main()
