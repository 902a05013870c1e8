#!/usr/bin/env python
"""Agreement across world sizes (issue 9, run 1): the same 20 training steps on 1 GPU and on N GPUs
under FSDP2 give the same losses and the same exported adapter.

    torchrun --nproc_per_node 1 bench/agreement.py --out runs/agree1
    torchrun --nproc_per_node N bench/agreement.py --out runs/agreeN
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


def train(out: Path, ckpt: Path) -> None:
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    import svd_scale
    from svd_scale import fsdp
    from svd_scale.io import save_adapter

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0 and not (ckpt / "config.json").is_file():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                                     num_key_value_heads=16, vocab_size=32000)).save_pretrained(ckpt)
    dist.barrier()
    model = fsdp.load_sharded(str(ckpt), svd_scale.AdapterConfig(rank=64, svd="full"), torch.float32)
    dev = next(model.parameters()).device
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        x = torch.randint(0, 32000, (GLOBAL_BATCH, SEQ), generator=g).chunk(world)[rank].to(dev)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(t.item() / world)
    save_adapter(model, str(out / "adapter"))
    if rank == 0:
        name = torch.cuda.get_device_name() if cuda else "CPU"
        (out / "losses.json").write_text(json.dumps({"world": world, "device": name, "losses": losses}))
    dist.destroy_process_group()


def compare(a: Path, b: Path, write: str = None) -> None:
    from safetensors.torch import load_file

    la, lb = (json.loads((p / "losses.json").read_text()) for p in (a, b))
    ta, tb = torch.tensor(la["losses"]), torch.tensor(lb["losses"])
    rel = ((ta - tb).abs() / ta.abs()).max().item()
    wa, wb = (load_file(str(p / "adapter" / "adapter.safetensors")) for p in (a, b))
    adapter = max(((wa[k] - wb[k]).abs().max() / wa[k].abs().max().clamp_min(1e-12)).item() for k in wa)
    lines = [f"# Agreement: FSDP2 on {la['world']} vs {lb['world']} GPU(s), {STEPS} steps", "",
             f"- device: {la['device']}; date {datetime.date.today()}",
             "- commands: `torchrun --nproc_per_node W bench/agreement.py --out DIR` for each W, then "
             "`python bench/agreement.py --compare DIR1 DIR2`", "",
             f"| step | loss ({la['world']} GPU) | loss ({lb['world']} GPUs) |", "|---|---|---|"]
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
    a = ap.parse_args()
    if a.compare:
        return compare(Path(a.compare[0]), Path(a.compare[1]), a.write)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    train(Path(a.out), Path(a.ckpt))


if __name__ == "__main__":
    main()
