#!/usr/bin/env python
"""The quickstart's baseline: the real PEFT library's LoRA r=16 on all seven projections,
through the same data, steps, batch, loop and evaluation as svd_scale.

    python bench/peft_lora_quickstart.py [--config configs/quickstart.yaml] [key=value ...]

Writes <train.output_dir>/metrics.json (default runs/peft_lora_r16).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from svd_scale.config import load_config  # noqa: E402
from svd_scale.training import run  # noqa: E402

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    cfg = load_config(a.config, ("train.output_dir=runs/peft_lora_r16", "train.lr=3e-4", *a.overrides))

    def adapt(model):
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=a.r, lora_alpha=2 * a.r, lora_dropout=0.0, target_modules=LLAMA_PROJECTIONS))

    run(cfg, adapt=adapt)


if __name__ == "__main__":
    main()
