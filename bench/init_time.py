#!/usr/bin/env python
"""Adapter initialization time of all 224 target weights of a Llama-2-7B-shaped model, one GPU.

    python bench/init_time.py [--layers 32] [--rows all]

Each row builds the bf16 model with random weights (shapes decide the cost), then times
``svd_scale.apply`` end to end: per weight an SVD (randomized ``torch.svd_lowrank`` or full
``torch.linalg.svd`` with cuSOLVER's gesvda driver), the residual, and for NF4 rows the
bitsandbytes quantization (T = quant_iters rounds of QPiSSA refinement). It also reports the
peak memory added by the init, and, for the full SVD, how far gesvda's top-r singular values
are from the default driver's on three weights. Writes bench/results/init_time_<device>.md.
"""
import argparse
import datetime
import gc
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_throughput import PROJ, build  # noqa: E402

ROWS = [  # (svd, rank, quant, quant_iters)
    ("randomized", 64, "nf4", 1), ("randomized", 128, "nf4", 1), ("randomized", 64, "nf4", 5),
    ("randomized", 64, "none", None), ("full", 64, "nf4", 1), ("full", 128, "nf4", 1),
]


def name(r) -> str:
    svd, rank, quant, t = r
    return f"{svd} r{rank} {quant}" + (f" T={t}" if quant == "nf4" else "")


def time_row(r, layers: int) -> dict:
    import svd_scale

    svd, rank, quant, t = r
    model = build(layers)
    torch.cuda.synchronize()
    base_mem = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    svd_scale.apply(model, svd_scale.AdapterConfig(rank=rank, target_modules=PROJ, svd=svd, quant=quant, quant_iters=t))
    torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    n = sum(1 for _ in svd_scale.inject.adapter_layers(model))
    out = {"row": name(r), "seconds": sec, "weights": n, "ms_per_weight": 1000 * sec / n,
           "init_peak_extra_gib": (torch.cuda.max_memory_allocated() - base_mem) / 2**30}
    print(f"{out['row']:28s} {sec:7.2f} s  {out['ms_per_weight']:7.1f} ms/weight  +{out['init_peak_extra_gib']:.2f} GiB peak",
          flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def gesvda_check(rank: int = 128) -> list[str]:
    """gesvda vs the default cuSOLVER driver on a 4096^2 and both 4096x11008 shapes."""
    from svd_scale.svd import _full_svd

    lines = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape in [(4096, 4096), (11008, 4096), (4096, 11008)]:
        # a decaying spectrum like trained weights': random orthogonal-ish times 1/sqrt(i)
        W = torch.randn(*shape, device="cuda", generator=g) * torch.rsqrt(torch.arange(1, shape[1] + 1, device="cuda"))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        U, S, Vh = _full_svd(W)
        torch.cuda.synchronize()
        t_a = time.perf_counter() - t0
        t0 = time.perf_counter()
        S_ref = torch.linalg.svdvals(W)
        torch.cuda.synchronize()
        t_d = time.perf_counter() - t0
        rel = ((S[:rank] - S_ref[:rank]).abs() / S_ref[:rank]).max().item()
        recon = (torch.linalg.norm(W - (U[:, :rank] * S[:rank]) @ Vh[:rank]) /
                 torch.linalg.norm(S_ref[rank:])).item()  # 1.0 = optimal rank-r error
        lines.append(f"| {shape[0]}x{shape[1]} | {t_a * 1000:.0f} | {t_d * 1000:.0f} | {rel:.1e} | {recon:.6f} |")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rows", default="all", help="comma-separated row names (see ROWS) or 'all'")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = ROWS if args.rows == "all" else [r for r in ROWS if name(r) in args.rows.split(",")]
    time_row(("randomized", 16, "nf4", 1), 1)  # warm-up: cuSOLVER/cuRAND handles, bitsandbytes kernels
    results = [time_row(r, args.layers) for r in rows]
    dev = torch.cuda.get_device_name()
    lines = [f"# Adapter init time, Llama-2-7B shape ({args.layers} layers, 7 projections each), one GPU", "",
             f"- device: {dev}; torch {torch.__version__}; date {datetime.date.today()}",
             f"- command: `python bench/init_time.py {' '.join(sys.argv[1:])}`",
             "- seconds: `svd_scale.apply` end to end (SVD + residual + NF4 quantization, in place); "
             "peak: memory added above the loaded bf16 model during init", "",
             "| row | seconds | weights | ms / weight | init peak extra GiB |", "|---|---|---|---|---|"]
    lines += [f"| {r['row']} | {r['seconds']:.2f} | {r['weights']} | {r['ms_per_weight']:.1f} | {r['init_peak_extra_gib']:.2f} |"
              for r in results]
    lines += ["", "Full SVD driver check (fp32, decaying spectrum): gesvda vs the default driver's singular values; "
              "rank-128 reconstruction error relative to the optimal (1.0 = exact)", "",
              "| shape | gesvda ms | default svdvals ms | max rel. error of top-128 S | rank-128 error / optimal |",
              "|---|---|---|---|---|"] + gesvda_check()
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out or ROOT / "bench" / "results" / f"init_time_{dev.replace(' ', '_')}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
