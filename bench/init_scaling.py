#!/usr/bin/env python
"""Sharding-aware init time vs world size under ZeRO-3 (CPU, gloo, or GPUs).

    DS_ACCELERATOR=cpu deepspeed --num_gpus N bench/init_scaling.py [--model builtin:smollm2-135m-instruct] [--svd full]

Loads the model partitioned (zero.Init), runs svd_scale's sharded init and appends one
row (world size, init seconds, peak gathered elements, local/total elements) to
bench/results/init_scaling.md. Run it for N = 1, 2, 3 to get the table.
"""
import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import svd_scale  # noqa: E402
from svd_scale import builtin  # noqa: E402
from svd_scale.engines.zero3 import ZeRO3Access, local_shard_numel, zero3_loading  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--svd", default="full", choices=["full", "randomized"])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--local_rank", type=int, default=-1)
    a = ap.parse_args()
    path = builtin.resolve_model_path(a.model)
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    ds = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "train_micro_batch_size_per_gpu": 1}
    with zero3_loading(ds, torch.float32):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    access = ZeRO3Access()
    dist.barrier()
    t0 = time.time()
    svd_scale.apply(model, svd_scale.AdapterConfig(rank=a.rank, svd=a.svd), access=access)
    dist.barrier()
    seconds = time.time() - t0
    local, total = local_shard_numel(model)
    if rank == 0:
        out = ROOT / "bench" / "results" / "init_scaling.md"
        if not out.exists():
            out.write_text("# Sharded init time vs world size (ZeRO-3)\n\n"
                           "Each row: `DS_ACCELERATOR=cpu deepspeed --num_gpus N bench/init_scaling.py ARGS` "
                           "(adapter factors stay whole until deepspeed.initialize, so local > total/N here).\n\n"
                           "| date | device | model | svd | r | world | init s | peak gathered elements | local / total elements |\n"
                           "|---|---|---|---|---|---|---|---|---|\n")
        dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {platform.machine()}"
        with out.open("a") as f:
            f.write(f"| {datetime.date.today()} | {dev} | {a.model} | {a.svd} | {a.rank} | {world} | {seconds:.1f} | "
                    f"{access.peak_gathered_numel:,} | {local:,} / {total:,} |\n")
        print(f"world={world} init {seconds:.1f} s")


if __name__ == "__main__":
    main()
