#!/usr/bin/env python
"""Per-rank memory of the FSDP2 path (issue 6): bf16 vs NF4 residual, under torchrun.

    torchrun --nproc_per_node N bench/fsdp2_memory.py [--layers 4] [--compile] [--quants none,nf4]
             [--reshard true,false] [--profile] [--json FILE] [--out FILE]

Rank 0 writes a Llama-2-7B-shaped checkpoint with random weights (``--layers`` decoder layers;
shapes decide memory), then every row loads it with ``svd_scale.engines.fsdp2.load_sharded`` (svd_scale r=64,
bf16, MixedPrecisionPolicy bf16) and reports per rank: parameter bytes held locally after init,
the peak allocated during load + init, and the peak of the training steps (seq ``--seq``, batch 1,
gradient checkpointing) and its tokens/s per rank (median of the steps after 2 warm-ups). With
``--compile`` every row runs again with its decoder layers under ``torch.compile`` (``train.compile``).
``--reshard false`` runs the rows with ``fully_shard(reshard_after_forward=False)`` (``true,false``: both) (a layer's gathered
parameters kept from its forward to its backward); ``--profile`` one extra torch.profiler and cProfile
step per row on rank 0 (tables to ``--profile-dir``, as ``bench/zero3_throughput.py`` writes them).
GPU if present (nccl), else CPU (gloo; memory from the local tensors only).
"""
import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch.distributed as dist  # noqa: E402


def row(path: Path, quant: str, cuda: bool, compiled: bool = False, steps: int = 5, reshard: bool = True,
        profile_dir: str | None = None, seq: int = 2048, optim: str = "fused") -> dict:
    import gc
    import statistics

    import svd_scale
    from svd_scale.engines import fsdp2 as fsdp
    from svd_scale.engines.base import compile_blocks

    gc.collect()  # what earlier rows of this process left
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    model = fsdp.load_sharded(str(path), svd_scale.AdapterConfig(rank=64, quant=quant, quant_iters=1), torch.bfloat16,
                              fsdp.mixed_precision("bf16"), reshard_after_forward=reshard)
    init_s = time.time() - t0
    local = sum(p.to_local().numel() * p.to_local().element_size() for p in model.parameters())
    label = f"svd_scale r64 {quant}" + (" compiled" if compiled else "") + ("" if reshard else " reshard_after_forward=False") \
        + ("" if optim == "foreach" else f" AdamW {optim}")
    out = {"row": label, "local_param_gib": local / 2**30,
           "init_s": init_s}
    if cuda:
        out["load_init_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    if compiled:
        compile_blocks(model)
    # fused: one kernel for all of a step's parameters, as transformers' Trainer runs it by default (adamw_torch_fused
    # on torch >= 2.8); foreach over FSDP2's 448 DTensor trainables took 81 ms of a cProfiled 7B step on an H200
    # (bench/results/zero3_fsdp2_70b_H200x4.md)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, **{optim: True})
    x = torch.randint(0, 32000, (1, seq), device="cuda" if cuda else "cpu")
    times = []

    def step():
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return loss.item()

    for i in range(2 + steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if i >= 2:
            times.append(time.perf_counter() - t)
    from zero3_throughput import _max

    med = _max(statistics.median(times))  # the slowest rank sets the pace (as bench/zero3_throughput.py reports it)
    out["tok_s"] = seq / med
    out["step_s"] = [round(t, 3) for t in times]
    if cuda:
        out["train_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if profile_dir is not None:
        from zero3_throughput import profile_step  # same tables as the ZeRO-3 bench

        profile_step(step, label.replace(" ", "_").replace("=", ""), "fsdp2", profile_dir, cuda, med)
    return out  # the model goes with this frame; the next row's gc.collect() frees what cycles hold


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ckpt", default="/tmp/svd_scale_fsdp2_7b_shape")
    ap.add_argument("--out", default=None)
    ap.add_argument("--compile", action="store_true", help="also run every row with compiled decoder layers")
    ap.add_argument("--quants", default="none,nf4", help="residual storages, comma-separated")
    ap.add_argument("--reshard", default="true", help="reshard_after_forward values, comma-separated (true,false)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--optim", default="fused", choices=("foreach", "fused"),
                    help="AdamW implementation (fused: what the launch path's Trainer runs, adamw_torch_fused; foreach: rows measured before 2026-11-27 call 5)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--profile", action="store_true", help="one profiled step per row (rank 0)")
    ap.add_argument("--profile-dir", default="runs/fsdp2_profile")
    ap.add_argument("--json", default=None, help="also write the rows' figures here")
    a = ap.parse_args()
    quants = a.quants.split(",")
    reshards = [v.strip().lower() for v in a.reshard.split(",")]
    bad = [q for q in quants if q not in ("none", "nf4")] + [v for v in reshards if v not in ("true", "false")]
    if bad:
        raise SystemExit(f"bad --quants/--reshard value(s) {bad}: allowed none|nf4 and true|false")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    path = Path(a.ckpt + f"_{a.layers}l")
    if rank == 0:
        from zero3_throughput import write_checkpoint  # the same random 7B-shape checkpoint as the ZeRO-3 bench

        write_checkpoint(path, "7b", a.layers)
    dist.barrier()
    results = []
    for c in ((False, True) if a.compile else (False,)):
        for q in quants:
            for rs in reshards:
                results.append(row(path, q, cuda, c, a.steps, rs == "true", a.profile_dir if a.profile else None,
                                   a.seq, a.optim))
                if rank == 0:
                    r = results[-1]
                    print(f"RESULT fsdp2 {r['row']:48s} {r['tok_s']:8,.0f} tok/s/rank  train peak "
                          f"{r.get('train_peak_gib', float('nan')):.2f} GiB  init {r['init_s']:.1f} s  steps {r['step_s']}",
                          flush=True)
                    if a.json:
                        Path(a.json).write_text(json.dumps(results))
    dev = torch.cuda.get_device_name() if cuda else "CPU"
    if rank == 0:
        lines = [f"# FSDP2 per-rank memory, Llama-2-7B shape ({a.layers} layers), {world} rank(s)", "",
                 f"- device: {dev}; torch {torch.__version__}; date {datetime.date.today()}",
                 f"- command: `torchrun --nproc_per_node {world} bench/fsdp2_memory.py {' '.join(sys.argv[1:])}`",
                 f"- svd_scale r=64, bf16 base, MixedPrecisionPolicy(bf16, reduce fp32); training: seq {a.seq}, batch 1, "
                 f"gradient checkpointing, AdamW ({a.optim}), 2 warm-up + {a.steps} timed steps (median, slowest rank); rank 0's memory", "",
                 "| row | local params GiB | load+init peak GiB | train peak GiB | tokens/s per rank | load+init s |",
                 "|---|---|---|---|---|---|"]
        for r in results:
            lines.append(f"| {r['row']} | {r['local_param_gib']:.2f} | {r.get('load_init_peak_gib', float('nan')):.2f} | "
                         f"{r.get('train_peak_gib', float('nan')):.2f} | {r['tok_s']:.0f} | {r['init_s']:.1f} |")
        text = "\n".join(lines) + "\n"
        print(text)
        if a.out:
            Path(a.out).write_text(text)
        print(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
