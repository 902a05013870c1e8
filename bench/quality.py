#!/usr/bin/env python
"""Fine-tuning quality and the default learning rate: svd_scale against SVFit and the real PEFT library.

    python bench/quality.py            # CPU, resumable: finished runs are kept under runs/quality/

Real model (SmolLM2-135M-Instruct) and three real tasks with fixed splits (``svd_scale.data``):
``rotten_tomatoes`` (sentiment), ``plot_vs_review`` (plot synopsis or review) and
``debate_speaker`` (who said a 2016 debate statement: three classes; added for issue 20 and
never used to choose anything). The validation split picks rates; the test split is never
used for a choice.

For every task and every row (``ROWS``; the issue-20 rows by default, ``--only`` for others):

1. the rate grid, seed 0: train at each rate (one more step beyond an edge if the best
   validation accuracy is there), score validation and test;
2. the row's *default* rate (what a user who sets no ``train.lr`` gets: the method's
   ``default_lr``; PEFT rows have none) against its *best* rate (best validation accuracy):
   test accuracy of both and the gap -- the target is a gap under 1 point on every task;
3. seeds 1 and 2 of the main rows at the rate a user would run: svd_scale at its
   default, PEFT LoRA at its best rate;
4. a rank sweep of svd_scale at its default rate (``RANKS``).

``svd_scale`` rows train ``sigma_update=relative`` (the default since issue 20);
``svd_scale_absolute`` is the earlier parametrization, kept to show what changed. The shipped
default was chosen on rotten_tomatoes' validation split alone; the other two tasks check it.

Every run uses the same steps, batch, sequence length, schedule and data order
(``train.seed``), through ``svd_scale.training.run`` (PEFT enters through its
``adapt`` hook), so the only difference between rows is the adapter and the rate.
Writes bench/results/quality.md and docs/quality.png. (The 2026-11-25 all-methods table is
bench/results/quality_methods_2026-11-25.md.) The runs behind the current tables (metrics.json and
test.json of each) are archived in bench/results/quality_runs.tgz: ``tar xzf
bench/results/quality_runs.tgz -C runs && python bench/quality.py --report-only`` rewrites the tables.

Cost: the full protocol is 106 runs of 120 steps; on one H200 with ``--jobs=12`` they took four device
calls of 545, 562, 538 and 70 s (the cache carried between them).
On 2 CPU cores a run takes about 9 minutes: use e.g. ``--steps 24 --grid-seeds 1 --seeds 1 --ranks=``.
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
from svd_scale.methods import get_method  # noqa: E402

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TASKS = {t: f"builtin:{t}" for t in ("rotten_tomatoes", "plot_vs_review", "debate_speaker")}
# row -> (svd_scale adapter keys, or a PEFT LoraConfig's keys under "peft"), lr grid (steps of ~3x;
# a best at an edge gets one more step beyond it, ``beyond``).
LOW_RANK = (1e-4, 3e-4, 1e-3)
ROWS = {
    "svd_scale": ({"method": "svd_scale", "rank": 64}, (1e-3, 3e-3, 1e-2, 3e-2)),
    "svd_scale_absolute": ({"method": "svd_scale", "rank": 64, "sigma_update": "absolute"}, (1e-3, 3e-3, 1e-2)),
    "svfit": ({"method": "svfit", "rank": 64}, (3e-3, 1e-2, 3e-2)),
    "peft_lora": ({"peft": {"r": 16, "lora_alpha": 32}}, (3e-4, 1e-3, 3e-3)),
    "sorsa": ({"method": "sorsa", "rank": 16}, LOW_RANK),
    "pissa": ({"method": "pissa", "rank": 16}, LOW_RANK),
    "kasa": ({"method": "kasa", "rank": 16}, (3e-4, 1e-3, 3e-3)),
    "salora": ({"method": "salora", "rank": 16}, LOW_RANK),
    "peft_pissa": ({"peft": {"r": 16, "lora_alpha": 16, "init_lora_weights": "pissa_niter_4"}}, LOW_RANK),
}
ISSUE_ROWS = ("svd_scale", "svd_scale_absolute", "svfit", "peft_lora")
MAIN = {"svd_scale": "default", "peft_lora": "best"}  # row -> which rate gets the extra seeds
RANKS = (16, 32, 64, 128, 192)  # 192: the largest rank every SmolLM2 layer allows (k_proj, v_proj are 192 x 576)


def default_lr(row: str):
    """The rate a user gets without setting train.lr (None for PEFT rows: PEFT has no default)."""
    keys = ROWS[row][0]
    if "peft" in keys:
        return None
    if keys.get("sigma_update") == "absolute":
        return 3e-3  # the shipped default before issue 20
    return get_method(keys["method"]).default_lr


def peft_adapt(keys: dict):
    def adapt(model):
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(lora_dropout=0.0, target_modules=PROJ, **keys))

    return adapt


class Bench:
    def __init__(self, a):
        self.a, self.out = a, Path(a.out)

    def run_dir(self, task: str, row: str, lr: float, seed: int, rank=None) -> Path:
        r = f"_r{rank}" if rank else ""
        return self.out / task / f"{row}{r}_lr{lr:g}_seed{seed}_steps{self.a.steps}"

    def train(self, task: str, row: str, lr: float, seed: int = 0, rank=None) -> dict:
        """One fine-tuning run scored on the validation split (by the run) and on the test split
        (here, while the model is in memory); cached in its folder's metrics.json / test.json."""
        from svd_scale.data import load_splits
        from svd_scale.evaluate import choice_accuracy
        from svd_scale.training import run

        d = self.run_dir(task, row, lr, seed, rank)
        if (d / "test.json").is_file():
            return {**json.loads((d / "metrics.json").read_text()), **json.loads((d / "test.json").read_text())}
        if self.a.report_only:
            return None
        keys = dict(ROWS[row][0], **({"rank": rank} if rank else {}))
        peft_keys = keys.pop("peft", None)
        over = [f"data={TASKS[task]}", f"train.output_dir={d}", f"train.max_steps={self.a.steps}",
                f"train.batch_size={self.a.batch}", f"train.max_length={self.a.max_length}", f"train.lr={lr}",
                f"train.seed={seed}", "train.logging_steps=2", f"train.eval_examples={self.a.val}",
                "train.eval_split=validation", "train.eval_before=false", "train.overwrite=true",
                "train.compile=false"]  # the recorded tables were measured eager, before train.compile defaulted to auto
        over += [f"adapter.{k}={v}" for k, v in keys.items()]
        print(f"=== {task} {row} r={rank or keys.get('rank', 16)} lr={lr:g} seed={seed}", flush=True)
        kept = {}
        m = run(load_config(None, tuple(over)), adapt=peft_adapt(peft_keys) if peft_keys else None, keep=kept)
        test = {"test_accuracy": choice_accuracy(kept["model"], kept["tokenizer"], load_splits(TASKS[task]).test[: self.a.test])}
        (d / "test.json").write_text(json.dumps(test))
        kept.clear()
        gc.collect()
        return {**m, **test}

    def grid(self, task: str, row: str) -> dict:
        """lr -> [runs of seeds 0..grid_seeds-1] over the row's grid, its default rate, and one step beyond
        an edge best."""
        lrs = tuple(sorted(set(ROWS[row][1]) | ({default_lr(row)} - {None})))
        seeds = range(self.a.grid_seeds)
        runs = {lr: [self.train(task, row, lr, s) for s in seeds] for lr in lrs}
        if any(m is None for v in runs.values() for m in v):
            return None
        ext = beyond(lrs, best_lr(runs))
        if ext is not None:
            runs[ext] = [self.train(task, row, ext, s) for s in seeds]
            if any(m is None for m in runs[ext]):
                return None
        return runs

    def base_accuracy(self, task: str) -> float:
        cache = self.out / task / "base.json"
        if cache.is_file():
            return json.loads(cache.read_text())["accuracy"]
        if self.a.report_only:
            return None
        from svd_scale.data import load_splits
        from svd_scale.evaluate import choice_accuracy
        from svd_scale.training import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(load_config(None, (f"data={TASKS[task]}",)))
        acc = choice_accuracy(model, tok, load_splits(TASKS[task]).test[: self.a.test])
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"accuracy": acc}))
        return acc


def mean(runs: list, key: str) -> float:
    return sum(m[key] for m in runs) / len(runs)


def best_lr(runs: dict) -> float:
    """The rate with the best mean validation accuracy over the grid's seeds (ties: the lower final loss)."""
    return max(runs, key=lambda lr: (mean(runs[lr], "accuracy_after"), -sum(map(final_loss, runs[lr]))))


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


def collect(b: Bench, rows: list, ranks: tuple) -> dict:
    """task -> {"grid": row -> lr -> run, "seeds": row -> [runs], "ranks": rank -> run, "base": acc}."""
    res = {}
    for task in TASKS:
        r = res[task] = {"grid": {}, "seeds": {}, "ranks": {}}
        for row in rows:
            g = b.grid(task, row)
            if g is None:
                continue
            r["grid"][row] = g
            if row in MAIN:
                lr = default_lr(row) if MAIN[row] == "default" else best_lr(g)
                more = [b.train(task, row, lr, seed) for seed in range(len(g[lr]), b.a.seeds)]
                r["seeds"][row] = (lr, g[lr] + [m for m in more if m is not None])
        if "svd_scale" in rows:
            for k in ranks:
                m = r["grid"].get("svd_scale", {}).get(default_lr("svd_scale"), [None])[0] if k == 64 else \
                    b.train(task, "svd_scale", default_lr("svd_scale"), 0, rank=k)
                if m is not None:
                    r["ranks"][k] = m
        r["base"] = b.base_accuracy(task)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--val", type=int, default=128, help="validation examples for picking lr")
    ap.add_argument("--test", type=int, default=500, help="test examples (debate_speaker has 300)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds for the main rows at the rate a user runs")
    ap.add_argument("--grid-seeds", type=int, default=2, help="seeds for every grid rate (the best rate is the best mean)")
    ap.add_argument("--jobs", type=int, default=1, help="train the (task, row) pairs in this many processes at once "
                    "(a GPU machine: 8); then write the tables")
    ap.add_argument("--ranks", default=",".join(map(str, RANKS)), help="svd_scale rank sweep ('' for none)")
    ap.add_argument("--report-only", action="store_true", help="write the tables from finished runs only (train nothing)")
    ap.add_argument("--only", default=",".join(ISSUE_ROWS), help=f"comma-separated rows to run; known: {list(ROWS)}")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks")
    ap.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    for t in set(TASKS) - set(a.tasks.split(",")):
        del TASKS[t]
    rows = [r for r in a.only.split(",") if r]
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise SystemExit(f"--only: unknown rows {sorted(unknown)}; known: {list(ROWS)}")
    t0 = time.time()
    if a.jobs > 1 and not a.report_only:
        parallel(a, rows)
    res = collect(Bench(a), rows, tuple(int(k) for k in a.ranks.split(",") if k))
    if not a.no_report:
        write_results(a, res, time.time() - t0)


def parallel(a, rows: list) -> None:
    """Each (task, row) pair in its own process, ``--jobs`` at a time (they share only the run cache, each
    run in its own folder); the caller then reads every finished run from the cache."""
    import subprocess

    keep = [f"--out={a.out}", f"--steps={a.steps}", f"--batch={a.batch}", f"--max-length={a.max_length}", f"--val={a.val}",
            f"--test={a.test}", f"--seeds={a.seeds}", f"--grid-seeds={a.grid_seeds}", f"--ranks={a.ranks}"]
    todo = [(t, r) for t in TASKS for r in rows]
    live: list = []
    while todo or live:
        while todo and len(live) < a.jobs:
            t, r = todo.pop(0)
            log = Path(a.out) / "logs" / f"{t}_{r}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, __file__, *keep, "--jobs=1", f"--tasks={t}", f"--only={r}", "--no-report"]
            live.append(subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT))
        time.sleep(2)
        live = [p for p in live if p.poll() is None]


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def runs_at(r: dict, row: str, lr: float) -> list:
    """Every seed run at ``lr`` (the grid's, plus the main rows' extra seeds)."""
    extra = r["seeds"].get(row)
    return extra[1] if extra and extra[0] == lr else r["grid"][row][lr]


def _acc(runs: list) -> str:
    """Mean test accuracy (%) over the runs, with its range and n when several."""
    accs = [100 * m["test_accuracy"] for m in runs]
    mean_ = sum(accs) / len(accs)
    return f"{mean_:.1f}" if len(accs) == 1 else f"{mean_:.1f} ({min(accs):.1f}–{max(accs):.1f}, n={len(accs)})"


def summary_lines(res: dict) -> list:
    """The default-vs-best table: one line per task and row (mean test accuracy over the seeds run)."""
    lines = ["| task | method | trainable | default lr | test @ default | best lr (val) | test @ best | gap (points) |",
             "|---|---|---|---|---|---|---|---|"]
    for task, r in res.items():
        for row, g in r["grid"].items():
            d, b = default_lr(row), best_lr(g)
            at_b = runs_at(r, row, b)
            at_d = runs_at(r, row, d) if d in g else None
            gap = "–" if at_d is None else f"{100 * (mean(at_b, 'test_accuracy') - mean(at_d, 'test_accuracy')):+.1f}"
            lines.append(f"| {task} | {row} | {at_b[0]['trainable_params']:,} | {'–' if d is None else f'{d:g}'} | "
                         f"{'–' if at_d is None else _acc(at_d)} | {b:g} | {_acc(at_b)} | {gap} |")
    return lines


def where() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (fp32, one process per (task, row))"
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def write_results(a, res: dict, seconds: float) -> None:
    cmd = "python bench/quality.py" + "".join(f" {x}" for x in sys.argv[1:])
    log = Path(a.out) / "invocations.json"  # every invocation that trained something, for the header
    past = json.loads(log.read_text()) if log.is_file() else []
    if seconds >= 60 and not a.report_only:
        past.append({"date": str(datetime.date.today()), "command": cmd, "minutes": round(seconds / 60), "device": where()})
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(json.dumps(past, indent=1))
    made = "; ".join(f"`{p['command']}` on {p['date']}, {p.get('device', 'CPU')}: {p['minutes']} min" for p in past) or "none recorded"
    lines = [
        "# Fine-tuning quality and the default learning rate: SmolLM2-135M-Instruct, three tasks",
        "",
        f"- tables written "
        f"{datetime.date.today()} by `{cmd}` from the runs cached under `{a.out}`; the invocations that trained them: {made}",
        f"- protocol: {a.steps} steps x batch {a.batch}, max length {a.max_length}, AdamW, cosine, 3% warm-up, fp32, "
        f"loss on the label token + EOS; the same data order (seed) for every row; validation = {a.val} examples "
        f"(picks the best rate), test = {a.test} fixed held-out examples (300 for debate_speaker), never used for a choice",
        "- default lr: what a user who sets no `train.lr` gets (the method's `default_lr`; svd_scale's was chosen on "
        "rotten_tomatoes' validation split only); best lr: the grid rate with the best mean validation accuracy over "
        f"the grid's {a.grid_seeds} seeds",
        "",
        "## Default rate vs best rate (test accuracy, %: mean over the seeds run at that rate (range, n))", "",
    ] + summary_lines(res) + ["", "## Seeds (test accuracy, %: mean (range, n))", "",
                              "| task | method | lr | test accuracy |", "|---|---|---|---|"]
    for task, r in res.items():
        for row, (lr, runs) in r["seeds"].items():
            lines.append(f"| {task} | {row} ({MAIN[row]} rate) | {lr:g} | {_acc(runs)} |")
    lines += ["", "## Rank sweep: svd_scale at its default rate (test accuracy, %, seed 0)", "",
              "| task | " + " | ".join(f"r={k}" for k in RANKS) + " |", "|---|" + "---|" * len(RANKS)]
    for task, r in res.items():
        if r["ranks"]:
            lines.append(f"| {task} | " + " | ".join(
                f"{_pct(r['ranks'][k]['test_accuracy'])} ({r['ranks'][k]['trainable_params']:,})" if k in r["ranks"] else "–"
                for k in RANKS) + " |")
    lines += ["", "## Every grid rate: lr: validation / test accuracy, %, mean over the grid's seeds", ""]
    for task, r in res.items():
        lines += [f"### {task} (base model, no training: {_pct(r['base'])}% test)", "", "| method | runs |", "|---|---|"]
        for row, g in r["grid"].items():
            lines.append(f"| {row} | " + "; ".join(f"{lr:g}: {_pct(mean(v, 'accuracy_after'))} / {_pct(mean(v, 'test_accuracy'))}"
                                                  for lr, v in sorted(g.items())) + " |")
        lines.append("")
    out = ROOT / "bench" / "results" / "quality.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(res, ROOT / "docs" / "quality.png")
    print(f"wrote {out} and docs/quality.png")


def plot(res: dict, path: Path) -> None:
    """Test accuracy vs trainable parameters: every grid row at its best and its default rate, and the rank sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(res), figsize=(5 * len(res), 4.5), squeeze=False)
    for ax, (task, r) in zip(axes[0], res.items()):
        for row, g in r["grid"].items():
            b, d = best_lr(g), default_lr(row)
            x, yb = g[b][0]["trainable_params"], 100 * mean(runs_at(r, row, b), "test_accuracy")
            ax.scatter(x, yb, marker="o")
            ax.annotate(f"{row} (best lr)", (x, yb), fontsize=7, xytext=(3, 3), textcoords="offset points")
            if d in g and d != b:
                yd = 100 * mean(runs_at(r, row, d), "test_accuracy")
                ax.scatter(x, yd, marker="x")
                ax.annotate(f"{row} (default)", (x, yd), fontsize=7, xytext=(3, -9), textcoords="offset points")
        if r["ranks"]:
            ks = sorted(r["ranks"])
            ax.plot([r["ranks"][k]["trainable_params"] for k in ks], [100 * r["ranks"][k]["test_accuracy"] for k in ks],
                    "-s", ms=4, label="svd_scale, r = " + ", ".join(map(str, ks)))
            ax.legend(fontsize=7)
        ax.set(xscale="log", xlabel="trainable parameters (log)", ylabel="test accuracy (%)", title=task)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
