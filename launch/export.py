#!/usr/bin/env python
"""Export a trained adapter for other tools: a PEFT folder, or a merged transformers checkpoint.

    python launch/export.py ADAPTER_DIR --base MODEL --to peft OUT_DIR [--form auto|dora|lora] [--rank K]
    python launch/export.py ADAPTER_DIR --base MODEL --to merged OUT_DIR

``--to peft``: loads with ``peft.PeftModel.from_pretrained(base, OUT_DIR)``; exact (DoRA for svd_scale,
LoRA for the other methods); ``--form lora --rank K`` writes the best rank-K LoRA and prints its error.
``--to merged``: a plain checkpoint for ``AutoModelForCausalLM.from_pretrained``, vLLM or TGI, with the
base's tokenizer and chat template, written shard by shard (a 70B base is never held whole).
MODEL is the base's Hugging Face folder (``builtin:smollm2-135m-instruct`` for the built-in one).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("adapter", help="an svd_scale adapter folder (e.g. runs/quickstart/adapter)")
    ap.add_argument("out", help="the folder to write")
    ap.add_argument("--base", required=True, help="the base model's folder (safetensors)")
    ap.add_argument("--to", required=True, choices=["peft", "merged"])
    ap.add_argument("--form", default="auto", choices=["auto", "dora", "lora"], help="--to peft only")
    ap.add_argument("--rank", type=int, default=None, help="--to peft --form lora: the LoRA rank (approximate below exact)")
    args = ap.parse_args(argv)
    if args.to == "merged" and (args.form != "auto" or args.rank is not None):
        ap.error("--form and --rank apply to --to peft")

    from svd_scale.builtin import resolve_model_path
    from svd_scale.export import export_merged, export_peft

    base = resolve_model_path(args.base)
    try:
        if args.to == "merged":
            done = export_merged(args.adapter, base, args.out)
            print(f"merged checkpoint written to {done['out_dir']} ({done['layers']} layers merged, "
                  f"{done['shards']} shard(s)); files: {', '.join(done['copied'])}")
            return
        rep = export_peft(args.adapter, args.out, base=base, form=args.form, rank=args.rank)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"export failed: {e}")
    kind = "DoRA" if rep["form"] == "dora" else "LoRA"
    exact = "exact" if rep["exact"] else (f"approximate: relative error of the weight change max "
                                          f"{rep['max_relative_error']:.3g}, mean {rep['mean_relative_error']:.3g}")
    print(f"PEFT {kind} adapter (rank {'/'.join(map(str, rep['ranks']))}, {rep['layers']} layers) written to "
          f"{args.out}: {exact}" + (f"\nnote: {rep['note']}" if rep["note"] else ""))


if __name__ == "__main__":
    main()
