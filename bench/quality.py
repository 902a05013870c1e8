#!/usr/bin/env python
"""Fine-tuning quality: every method against the real PEFT library, side by side (issue 8).

    python bench/quality.py            # CPU, resumable: finished runs are kept under runs/quality/

Real model (SmolLM2-135M-Instruct) and real data, two tasks with fixed splits
(``svd_scale.data``: test 500 never used for tuning, validation for picking lr):

1. ``rotten_tomatoes`` (sentiment): every method -- svd_scale, svfit, sorsa, kasa, salora,
   in-framework pissa -- and PEFT LoRA r=16 and PEFT PiSSA r=16, each at every learning
   rate of its grid (``ROWS``; one more step beyond an edge if the best is there) with seed 0,
   scored on the validation split; the lr with the best validation accuracy is then scored
   once on the test split. The main rows
   (svd_scale, PEFT LoRA) get a second seed. NF4 rows (svd_scale over a 4-bit residual,
   PEFT QLoRA r=16) reuse their full-precision counterpart's lr.
2. ``plot_vs_review`` (plot synopsis vs review; balanced): svd_scale, PEFT LoRA, SORSA
   and PiSSA at the lr chosen on task 1 -- a transfer check, so that no default is tuned
   to one task -- with two seeds for the main rows.

Every run uses the same steps, batch, sequence length, schedule and data order
(``train.seed``), through ``svd_scale.training.run`` (PEFT enters through its
``adapt`` hook), so the only difference between rows is the adapter.
Writes bench/results/quality.md and docs/quality.png.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from svd_scale.config import load_config  # noqa: E402

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TASKS = {"rotten_tomatoes": "builtin:rotten_tomatoes", "plot_vs_review": "builtin:plot_vs_review"}
MAIN = ("svd_scale", "peft_lora")
TRANSFER = ("svd_scale", "peft_lora", "sorsa", "pissa")
# row -> (svd_scale adapter keys, or a PEFT LoraConfig's keys under "peft"), lr grid.
# Grids bracket each family's usual range for a short run: sigma-only methods need
# large rates (docs/methods.md); low-rank matrix methods the LoRA range. Three points each, in
# steps of ~3x; a best at an edge gets one more step beyond it (``beyond``).
LOW_RANK = (1e-4, 3e-4, 1e-3)
ROWS = {
    "svd_scale": ({"method": "svd_scale", "rank": 64}, (3e-3, 1e-2, 3e-2)),
    "svfit": ({"method": "svfit", "rank": 64}, (3e-3, 1e-2, 3e-2)),
    "sorsa": ({"method": "sorsa", "rank": 16}, LOW_RANK),
    "pissa": ({"method": "pissa", "rank": 16}, LOW_RANK),
    "kasa": ({"method": "kasa", "rank": 16}, (3e-4, 1e-3, 3e-3)),
    "salora": ({"method": "salora", "rank": 16}, LOW_RANK),
    "peft_lora": ({"peft": {"r": 16, "lora_alpha": 32}}, LOW_RANK),
    "peft_pissa": ({"peft": {"r": 16, "lora_alpha": 16, "init_lora_weights": "pissa_niter_4"}}, LOW_RANK),
}
NF4_ROWS = {  # row -> (counterpart whose lr it uses, adapter keys)
    "svd_scale+nf4": ("svd_scale", {"method": "svd_scale", "rank": 64, "quant": "nf4"}),
    "peft_qlora": ("peft_lora", {"peft": {"r": 16, "lora_alpha": 32}, "load_4bit": True}),
}


def peft_adapt(keys: dict, model_path: str, load_4bit: bool):
    def adapt(model):
        from peft import LoraConfig, get_peft_model

        if load_4bit:  # QLoRA: the base loaded by transformers' bitsandbytes path
            from transformers import AutoModelForCausalLM, BitsAndBytesConfig

            del model
            gc.collect()
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                   bnb_4bit_quant_storage=torch.bfloat16)
            model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=q, dtype=torch.float32,
                                                         device_map="cpu")
        return get_peft_model(model, LoraConfig(lora_dropout=0.0, target_modules=PROJ, **keys))

    return adapt


class Bench:
    def __init__(self, a):
        self.a, self.out = a, Path(a.out)

    def run_dir(self, task: str, row: str, lr: float, seed: int, split: str) -> Path:
        return self.out / task / f"{row}_lr{lr:g}_seed{seed}_{split}"

    def train(self, task: str, row: str, keys: dict, lr: float, seed: int, split: str, n_eval: int,
              keep: dict = None) -> dict:
        """One fine-tuning run (cached: a finished run's metrics.json is reused unless ``keep``
        asks for the trained model)."""
        from svd_scale.builtin import resolve_model_path
        from svd_scale.training import run

        d = self.run_dir(task, row, lr, seed, split)
        if keep is None and (d / "metrics.json").is_file():
            return json.loads((d / "metrics.json").read_text())
        if self.a.report_only:
            return None
        keys = dict(keys)
        peft_keys, load_4bit = keys.pop("peft", None), keys.pop("load_4bit", False)
        over = [f"data={TASKS[task]}", f"train.output_dir={d}", f"train.max_steps={self.a.steps}",
                f"train.batch_size={self.a.batch}", f"train.max_length={self.a.max_length}", f"train.lr={lr}",
                f"train.seed={seed}", "train.logging_steps=2", f"train.eval_examples={n_eval}",
                f"train.eval_split={split}", "train.eval_before=false", "train.overwrite=true"]
        over += [f"adapter.{k}={v}" for k, v in keys.items()]
        cfg = load_config(None, tuple(over))
        print(f"=== {task} {row} lr={lr:g} seed={seed} ({split})", flush=True)
        adapt = peft_adapt(peft_keys, resolve_model_path(cfg.model), load_4bit) if peft_keys else None
        m = run(cfg, adapt=adapt, keep=keep)
        gc.collect()
        return m

    def grid(self, task: str, row: str, keys: dict, lrs: tuple) -> tuple[float, dict, float]:
        """Train at every lr (seed 0), pick the best validation accuracy -- and if that lr is at
        an edge of the grid, train the next step beyond it once (``beyond``) and pick again --
        then score the chosen run on the test split while its model is still in memory (a PEFT
        PiSSA adapter cannot be re-applied to the original base from its saved file alone)."""
        runs, best, kept = {}, None, {}
        score = (lambda lr: (runs[lr]["accuracy_after"], -final_loss(runs[lr])))
        if self.a.report_only:  # only runs already made; None if the row is incomplete
            runs = {lr: self.train(task, row, keys, lr, 0, "validation", self.a.val) for lr in lrs}
            if any(m is None for m in runs.values()):
                return None
            ext = beyond(lrs, max(lrs, key=score))
            if ext is not None:
                runs[ext] = self.train(task, row, keys, ext, 0, "validation", self.a.val)
                if runs[ext] is None:
                    return None
            best = max(runs, key=score)
            cache = self.run_dir(task, row, best, 0, "validation") / "test.json"
            if not cache.is_file():
                return None
            return best, runs, json.loads(cache.read_text())["accuracy"]
        todo = list(lrs)
        while todo:
            lr = todo.pop(0)
            cached = (self.run_dir(task, row, lr, 0, "validation") / "metrics.json").is_file()
            keep = None if cached else {}
            runs[lr] = self.train(task, row, keys, lr, 0, "validation", self.a.val, keep=keep)
            if best is None or score(lr) > score(best):
                best, kept = lr, keep  # the previous best's model is released here
            del keep
            gc.collect()
            if not todo and lr in lrs and beyond(lrs, best) is not None:
                todo.append(beyond(lrs, best))
        if not (self.run_dir(task, row, best, 0, "validation") / "test.json").is_file() and not kept:
            kept = {}  # an interrupted earlier invocation: train the chosen run again to score it
            self.train(task, row, keys, best, 0, "validation", self.a.val, keep=kept)
        cache = self.run_dir(task, row, best, 0, "validation") / "test.json"
        if not cache.is_file():
            from svd_scale.data import load_splits
            from svd_scale.evaluate import choice_accuracy

            acc = choice_accuracy(kept["model"], kept["tokenizer"], load_splits(TASKS[task]).test[: self.a.test])
            cache.write_text(json.dumps({"accuracy": acc}))
        if kept:
            kept.clear()
        return best, runs, json.loads(cache.read_text())["accuracy"]

    def base_accuracy(self, task: str) -> float:
        cache = self.out / task / "base.json"
        if cache.is_file():
            return json.loads(cache.read_text())["accuracy"]
        from svd_scale.data import load_splits
        from svd_scale.evaluate import choice_accuracy
        from svd_scale.training import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(load_config(None, (f"data={TASKS[task]}",)))
        acc = choice_accuracy(model, tok, load_splits(TASKS[task]).test[: self.a.test])
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"accuracy": acc}))
        return acc


def beyond(lrs: tuple, best: float):
    """The next learning rate past the grid's edge (steps of ~3x: 1e-3 -> 3e-4 -> 1e-4 ...) if
    ``best`` is at that edge, else None."""
    import math

    lo, hi = min(lrs), max(lrs)
    if best not in (lo, hi) or len(lrs) < 2:
        return None
    e = math.floor(math.log10(best) + 1e-9)
    one = abs(best / 10 ** e - 1) < 1e-6  # mantissa 1 (else 3)
    if best == lo:
        return float(f"{3 if one else 1}e{e - 1 if one else e}")
    return float(f"{3 if one else 1}e{e if one else e + 1}")


def final_loss(m: dict) -> float:
    """Mean of the last four logged losses (the last 8 steps): one logged batch is noisy."""
    tail = [l for _, l in m["losses"][-4:]]
    return sum(tail) / len(tail)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--val", type=int, default=128, help="validation examples for picking lr")
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--seeds", type=int, default=2, help="seeds for the main rows")
    ap.add_argument("--report-only", action="store_true", help="write the tables from finished runs only (train nothing)")
    ap.add_argument("--only", default="", help="comma-separated rows to run (default: all), e.g. svd_scale,peft_lora")
    a = ap.parse_args()
    only = set(filter(None, a.only.split(",")))
    unknown = only - set(ROWS) - set(NF4_ROWS)
    if unknown:
        raise SystemExit(f"--only: unknown rows {sorted(unknown)}; known: {list(ROWS) + list(NF4_ROWS)}")
    pick = (lambda r: not only or r in only)
    b, t0 = Bench(a), time.time()
    rows: dict = {t: {} for t in TASKS}  # task -> row -> result
    grid = {}
    rt = "rotten_tomatoes"
    twin_ok = (lambda r: NF4_ROWS[r][0] in rows[rt])
    for row, (keys, lrs) in ((r, v) for r, v in ROWS.items() if pick(r)):  # 1. grid on validation
        got = b.grid(rt, row, keys, lrs)
        if got is None:
            continue
        best, runs, acc = got
        grid[row] = {lr: m["accuracy_after"] for lr, m in runs.items()}
        rows[rt][row] = {"lr": best, "metrics": [runs[best]], "acc": [acc]}
    for row, (twin, keys) in ((r, v) for r, v in NF4_ROWS.items() if pick(r) and twin_ok(r)):
        m = b.train(rt, row, keys, rows[rt][twin]["lr"], 0, "test", a.test)
        if m is None:
            continue
        rows[rt][row] = {"lr": rows[rt][twin]["lr"], "metrics": [m], "acc": [m["accuracy_after"]]}
    for task in TASKS:  # 2. transfer task at the chosen lr; 3. extra seeds for the main rows
        for row in [r for r in TRANSFER if pick(r) and r in rows[rt]] if task != rt else ():
            lr = rows[rt][row]["lr"]
            m = b.train(task, row, ROWS[row][0], lr, 0, "test", a.test)
            if m is None:
                continue
            rows[task][row] = {"lr": lr, "metrics": [m], "acc": [m["accuracy_after"]]}
        for row in [r for r in MAIN if pick(r) and r in rows[task]]:
            for seed in range(1, a.seeds):
                m = b.train(task, row, ROWS[row][0], rows[task][row]["lr"], seed, "test", a.test)
                if m is None:
                    continue
                rows[task][row]["metrics"].append(m)
                rows[task][row]["acc"].append(m["accuracy_after"])
    base = {t: (None if a.report_only and not (b.out / t / "base.json").is_file() else b.base_accuracy(t)) for t in TASKS}
    write_results(a, rows, grid, base, time.time() - t0)


def _fmt_acc(accs: list) -> str:
    if len(accs) == 1:
        return f"{100 * accs[0]:.1f}%"
    mean = sum(accs) / len(accs)
    return f"{100 * mean:.1f}% ({' / '.join(f'{100 * x:.1f}' for x in accs)})"


def write_results(a, rows: dict, grid: dict, base: dict, seconds: float) -> None:
    cmd = "python bench/quality.py" + "".join(f" {x}" for x in sys.argv[1:])
    log = Path(a.out) / "invocations.json"  # every invocation that trained something, for the header
    past = json.loads(log.read_text()) if log.is_file() else []
    if seconds >= 60 and not a.report_only:
        past.append({"date": str(datetime.date.today()), "command": cmd, "minutes": round(seconds / 60)})
        log.write_text(json.dumps(past, indent=1))
    made = "; ".join(f"`{p['command']}` on {p['date']}: {p['minutes']} min" for p in past) or "none recorded"
    lines = [
        "# Fine-tuning quality: SmolLM2-135M-Instruct, every method vs the real PEFT library",
        "",
        f"- collected on CPU ({platform.machine()}, {torch.get_num_threads()} threads); tables written "
        f"{datetime.date.today()} by `{cmd}` from the runs cached under `{a.out}`; the invocations that trained them: {made}",
        f"- protocol: {a.steps} steps x batch {a.batch}, max length {a.max_length}, AdamW, cosine, 3% warm-up, fp32, "
        f"loss on the label token + EOS; the same data order (seed) for every row; lr chosen per method on "
        f"{a.val} validation examples of rotten_tomatoes (grid below); test = {a.test} fixed held-out examples never used for tuning",
        "- plot_vs_review reuses the lr chosen on rotten_tomatoes (a transfer check, nothing tuned on it)",
        "- accuracy with several seeds: mean (seed 0 / seed 1 ...); final loss: mean of the last 4 logged losses "
        "(last 8 steps) of seed 0, as the Trainer optimizes it, i.e. with the method's extra loss (SaLoRA's is dominated "
        "by its Lagrangian budget term, so its figure is not comparable); train s: wall time of seed 0's training on a "
        "shared 2-core machine (indicative only)",
        "",
    ]
    for task, table in rows.items():
        if not table:
            lines += [f"## {task}: no finished runs", ""]
            continue
        zero = "not measured" if base[task] is None else f"{100 * base[task]:.1f}% test accuracy"
        lines += [f"## {task} (base model, no training: {zero})", "",
                  "| method | trainable params | lr | test accuracy | final train loss | train s |", "|---|---|---|---|---|---|"]
        for row, r in table.items():
            m = r["metrics"][0]
            lines.append(f"| {row} | {m['trainable_params']:,} | {r['lr']:g} | {_fmt_acc(r['acc'])} | "
                         f"{final_loss(m):.4f} | {m['train_seconds']:.0f} |")
        lines.append("")
    lines += ["## Learning-rate grid (rotten_tomatoes, seed 0, validation accuracy)", "",
              "| method | " + " | ".join("lr / val acc" for _ in range(4)) + " |", "|---|---|---|---|---|"]
    for row, g in grid.items():
        cells = [f"{lr:g}: {100 * acc:.1f}%" for lr, acc in sorted(g.items())]
        lines.append(f"| {row} | " + " | ".join(cells + [""] * (4 - len(cells))) + " |")
    out = ROOT / "bench" / "results" / "quality.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, ROOT / "docs" / "quality.png")
    print(f"wrote {out} and docs/quality.png")


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row, r in rows["rotten_tomatoes"].items():
        steps, losses = zip(*r["metrics"][0]["losses"])
        ax1.plot(steps, losses, label=row, lw=2 if row in MAIN else 1)
    ax1.set(xlabel="step", ylabel="training loss (incl. extra losses)", title="rotten_tomatoes: training loss (seed 0)",
            yscale="log", ylim=(0.08, 20))  # SaLoRA's Lagrangian budget term runs off the top (see the table)
    ax1.legend(fontsize=8)
    for task, marker in zip(rows, "os"):
        for row, r in rows[task].items():
            x, y = r["metrics"][0]["trainable_params"], 100 * sum(r["acc"]) / len(r["acc"])
            ax2.scatter(x, y, marker=marker, label=f"{task}" if row == "svd_scale" else None)
            ax2.annotate(row, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax2.set(xscale="log", xlabel="trainable parameters (log)", ylabel="test accuracy (%)",
            title="test accuracy vs trainable parameters")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
