#!/usr/bin/env python
"""Quantization error of plain NF4 vs NF4 residual + rank-r factors, on real weights.

    python bench/quant_error.py [--model builtin:smollm2-135m-instruct] [--ranks 16 64 128] [--iters 1 5]
    python bench/quant_error.py --random-7b        # Llama-2-7B shapes, random N(0, 0.02) weights, on the GPU

For every target weight W (all seven projections of every layer) it measures the
relative Frobenius error ||W - W_hat|| / ||W||, summed over all weights
(sqrt(sum ||W - W_hat||^2) / sqrt(sum ||W||^2)), of
  * plain NF4:  W_hat = dequant(NF4(W))                              (bitsandbytes, block 64)
  * svd_scale:  W_hat = dequant(NF4(W - U S V^T)) + U S V^T           (U, V stored bf16, S fp32)
with T rounds of QPiSSA-style refinement (svd_scale.quant.nf4.refine_factors). Writes a
Markdown table to bench/results/quant_error_<model>.md with the device, date and command.
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

from svd_scale import builtin, svd as svdlib  # noqa: E402
from svd_scale.inject import find_targets
from svd_scale.layer import to_out_in  # noqa: E402
from svd_scale.quant.nf4 import nf4_roundtrip, refine_factors  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64, 128])
    ap.add_argument("--iters", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--svd", default="randomized", choices=["randomized", "full"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--random-7b", action="store_true", help="224 random weights of Llama-2-7B's shapes")
    a = ap.parse_args()
    t0 = time.time()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if a.random_7b:  # a flat (Marchenko-Pastur) spectrum: the hard case for keeping top-r in full precision
        a.model = "random-llama2-7b-shape"
        g = torch.Generator(device=dev).manual_seed(0)
        shapes = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
        weights = [0.02 * torch.randn(s, generator=g, device=dev) for _ in range(32) for s in shapes]
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(builtin.resolve_model_path(a.model), dtype=torch.float32)
        weights = [to_out_in(m, m.weight.detach()).float().to(dev) for _, m in find_targets(model, "all-linear")]
    norm2 = sum(float(W.pow(2).sum()) for W in weights)
    plain = sum(float((W - nf4_roundtrip(W)).pow(2).sum()) for W in weights)
    plain_rel = (plain / norm2) ** 0.5
    svd_fn = lambda W, r: svdlib.decompose(W, r, algorithm=a.svd)  # noqa: E731
    rows = []
    for r in a.ranks:
        for T in a.iters:
            err2 = 0.0
            for W in weights:
                f, _ = refine_factors(W, r, T, svd_fn)
                U, Vh = f.U.to(torch.bfloat16).float(), f.Vh.to(torch.bfloat16).float()
                low = (U * f.S) @ Vh
                err2 += float((W - (nf4_roundtrip(W - low) + low)).pow(2).sum())
            rel = (err2 / norm2) ** 0.5
            rows.append((r, T, rel, 100 * (1 - rel / plain_rel)))
            print(f"r={r:4d} T={T}: rel. error {rel:.5f} ({rows[-1][3]:.1f}% below plain NF4 {plain_rel:.5f})", flush=True)
    name = a.model.split(":")[-1].split("/")[-1]
    out = Path(a.out or ROOT / "bench" / "results" / f"quant_error_{name}.md")
    lines = [f"# NF4 quantization error on {a.model} ({len(weights)} target weights)", "",
             f"- command: `python bench/quant_error.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
             f"- device: {torch.cuda.get_device_name() if dev == 'cuda' else 'CPU ' + platform.machine()}, torch {torch.__version__}",
             f"- date: {datetime.date.today().isoformat()}; SVD: {a.svd}; wall time {time.time() - t0:.0f} s", "",
             "Relative Frobenius error over all target weights, sqrt(sum ||W - W_hat||^2 / sum ||W||^2).", "",
             "| representation | rank r | refinement T | rel. error | vs plain NF4 |", "|---|---|---|---|---|",
             f"| plain NF4 (bitsandbytes, block 64) | - | - | {plain_rel:.5f} | - |"]
    lines += [f"| NF4 residual + bf16 U, V | {r} | {T} | {rel:.5f} | {red:.1f}% lower |" for r, T, rel, red in rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
