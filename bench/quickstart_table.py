#!/usr/bin/env python
"""Collect quickstart runs' metrics.json into bench/results/quickstart.md.

    python bench/quickstart_table.py runs/quickstart runs/peft_lora_r16 ...

Each run folder holds metrics.json and run_config.json written by svd_scale.training.run.
"""
import datetime
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
    rows = ["| run | method | engine (world) | steps x batch | lr | trainable params | accuracy before | accuracy after | final logged loss | train s |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for d in map(Path, sys.argv[1:]):
        m = json.loads((d / "metrics.json").read_text())
        # a run from before run_config.json existed: its command was the plain quickstart
        cfg = json.loads((d / "run_config.json").read_text()) if (d / "run_config.json").exists() else \
            __import__("svd_scale.config", fromlist=["x"]).load_config(str(ROOT / "configs/quickstart.yaml")).to_dict()
        q = cfg["adapter"].get("quant", "none")
        method = m["method"] if m["method"] != "custom" else "PEFT LoRA (custom adapt)"
        pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
        rows.append(f"| {d.name} | {method}{' + nf4' if q == 'nf4' else ''} | {m.get('engine', 'single')} ({m.get('world_size', 1)}) | "
                    f"{m.get('steps', cfg['train']['max_steps'])} x {m.get('batch_size', cfg['train']['batch_size'])} | "
                    f"{m.get('lr', cfg['train']['lr'])} | {m['trainable_params']:,} | {pct(m.get('accuracy_before'))} | "
                    f"{pct(m.get('accuracy_after'))} | {m['losses'][-1][1]:.4f} | {m['train_seconds']} |")
    out = ROOT / "bench" / "results" / "quickstart.md"
    out.write_text("\n".join([
        "# Quickstart runs (SmolLM2-135M-Instruct, Rotten Tomatoes, 300 held-out test reviews)", "",
        f"- collected {datetime.date.today()} on CPU ({platform.machine()}, 2 cores) by `python bench/quickstart_table.py {' '.join(sys.argv[1:])}`",
        "- commands: see the README's quickstart table; each run's full config is in its run_config.json",
        "- train seconds are wall times on a shared 2-core machine (other jobs ran at the same time): not comparable between rows", "",
        *rows, ""]))
    print(out.read_text())


if __name__ == "__main__":
    main()
