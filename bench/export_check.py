#!/usr/bin/env python
"""How close each export form is to the trained model, on a real adapter (CPU).

    python bench/export_check.py ADAPTER_DIR [--base builtin:smollm2-135m-instruct] [--ranks 16,64,256]
                                 [--examples 32] [--out bench/results/export_quickstart.md]

Loads the adapter onto the base with svd_scale (the reference), exports it with ``launch/export.py``'s
functions as PEFT (auto form), as a merged checkpoint, and as rank-k LoRAs; loads each with PEFT or
plain transformers and reports the largest logit difference on held-out test prompts of the built-in
data, the label accuracy of each, and the reported error of the approximate forms.
"""
import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import svd_scale  # noqa: E402
from svd_scale.builtin import local_model_dir  # noqa: E402
from svd_scale.data import load_splits  # noqa: E402


def _scores(model, tok, records):
    """Last-position logits of each prompt (one at a time: no padding effects)."""
    out = []
    with torch.no_grad():
        for r in records:
            ids = tok(r["prompt"], return_tensors="pt")["input_ids"]
            out.append(model(ids).logits[0, -1])
    return torch.stack(out)


def _accuracy(logits, tok, records):
    labels = sorted({r["completion"] for r in records})
    first = [tok(l, add_special_tokens=False)["input_ids"][0] for l in labels]
    pred = [labels[int(i)] for i in logits[:, first].argmax(1)]
    return sum(p == r["completion"] for p, r in zip(pred, records)) / len(records)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("adapter")
    ap.add_argument("--base", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--data", default="builtin:rotten_tomatoes")
    ap.add_argument("--ranks", default="16,64,256")
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "bench/results/export_quickstart.md"))
    args = ap.parse_args()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = local_model_dir(args.base)
    load = lambda p=base: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()  # noqa: E731
    tok = AutoTokenizer.from_pretrained(base)
    records = load_splits(args.data).test[:args.examples]
    ref = _scores(svd_scale.load_adapter(load(), args.adapter).eval(), tok, records)
    rows = [("svd_scale (reference)", "-", 0.0, _accuracy(ref, tok, records), "-")]
    tmp = Path(tempfile.mkdtemp())
    forms = [("peft", None)] + [("lora", int(k)) for k in args.ranks.split(",")]
    for form, k in forms:
        t0 = time.time()
        rep = svd_scale.export_peft(args.adapter, str(tmp / f"{form}{k}"), base=base,
                                    form="auto" if form == "peft" else "lora", rank=k)
        secs = time.time() - t0
        got = _scores(PeftModel.from_pretrained(load(), str(tmp / f"{form}{k}")).eval(), tok, records)
        err = "exact" if rep["exact"] else f"{rep['max_relative_error']:.3g} max / {rep['mean_relative_error']:.3g} mean"
        rows.append((f"PEFT {rep['form']} r={'/'.join(map(str, rep['ranks']))}", err,
                     float((got - ref).abs().max()), _accuracy(got, tok, records), f"{secs:.1f}"))
    t0 = time.time()
    svd_scale.export_merged(args.adapter, base, str(tmp / "merged"))
    secs = time.time() - t0
    got = _scores(load(tmp / "merged"), tok, records)
    rows.append(("merged checkpoint", "exact", float((got - ref).abs().max()), _accuracy(got, tok, records), f"{secs:.1f}"))
    scale = float(ref.abs().max())
    table = ["| export | reported change error | max abs logit diff vs svd_scale | accuracy | export s |", "|---|---|---|---|---|"]
    table += [f"| {n} | {e} | {d:.3g} | {100 * a:.1f}% | {s} |" for n, e, d, a, s in rows]
    text = (f"# Export forms vs the trained model\n\n- date: {datetime.date.today()}; device: CPU\n"
            f"- command: `python bench/export_check.py {args.adapter} --base {args.base} --ranks {args.ranks} "
            f"--examples {args.examples}`\n- {len(records)} test prompts of {args.data}; largest |logit| {scale:.3g}\n\n"
            + "\n".join(table) + "\n")
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
