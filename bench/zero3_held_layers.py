#!/usr/bin/env python
"""How many decoder layers DeepSpeed ZeRO-3 still holds gathered at the end of the forward, per prefetch
bucket and reuse distance (issue 15; runs on CPU):

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 bench/zero3_held_layers.py --prefetch 8e5 --reuse 0

A 16-layer tiny Llama (random weights) with svd_scale r=64 and an NF4 residual, leaf decoder layers,
gradient checkpointing, persistence 1e3 (so the 4-bit codes are partitioned); 4 steps, and after each
forward, per layer, the fraction of its partitioned values still gathered. One layer here is 197,632
values. What it showed (bench/results/zero3_memory_H200x4.md): the prefetcher marks the layers it
passes in the backward's recomputation as needed again, so the held count grows with the bucket; with
the bucket at 0 (the engine's default) nothing is held.
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
import zero3_throughput as zt  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefetch", type=float, default=8e5, help="stage3_prefetch_bucket_size")
    ap.add_argument("--reuse", type=float, default=None, help="stage3_max_reuse_distance (DeepSpeed's default: 1e9)")
    ap.add_argument("--ckpt", default="/tmp/svd_scale_held_layers_tiny16")
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    deepspeed.init_distributed()
    path = Path(a.ckpt)
    if dist.get_rank() == 0:
        zt.write_checkpoint(path, "tiny", 16)
    dist.barrier()
    setting = f"leaf+persist:1e3+prefetch:{a.prefetch:g}+live" + (f"+reuse:{a.reuse:g}" if a.reuse is not None else "")
    ds = zt.ds_config("svd_scale_nf4", zt.SHAPES["tiny"]["hidden_size"], setting)
    model = zt.build("svd_scale_nf4", path, ds, setting)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    deepspeed.utils.set_z3_leaf_modules(model, zt.decoder_layer_classes(model))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    size = [sum(p.ds_numel for p in b.parameters() if not p.ds_persist) for b in layers]
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        x = torch.randint(0, 32000, (1, 64), generator=g)
        loss = engine(input_ids=x, labels=x).loss
        held = [sum(p.ds_numel for p in b.parameters() if p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_persist) / n
                for b, n in zip(layers, size)]
        if dist.get_rank() == 0:
            print(f"step {i} ({setting}): layers gathered after the forward {sum(h > 0 for h in held)} of {len(layers)}: "
                  f"{[round(h, 2) for h in held]}", flush=True)
        engine.backward(loss)
        engine.step()


if __name__ == "__main__":
    main()
