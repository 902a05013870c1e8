#!/usr/bin/env python
"""Fine-tune a model with an SVD adapter: parse -> build -> train -> save.

    python launch/train.py --config configs/quickstart.yaml [key=value ...]
    deepspeed launch/train.py --config configs/llama2-7b.yaml train.deepspeed=configs/deepspeed/zero3.json
    torchrun --nproc_per_node 2 launch/train.py --config configs/fsdp/quickstart.yaml
    python launch/train.py --help-config        # every key, its default and meaning
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from svd_scale.config import describe, load_config  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML file from configs/")
    ap.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                    help="continue from the newest complete checkpoint in train.output_dir, or from CHECKPOINT")
    ap.add_argument("--help-config", action="store_true", help="list every config key and exit")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. adapter.rank=64 train.lr=1e-2 method=sorsa")
    args = ap.parse_args(argv)
    if args.help_config:
        print(describe())
        return
    if isinstance(args.resume, str) and "=" in args.resume:  # `--resume key=value`: an override, not a folder
        args.overrides.insert(0, args.resume)
        args.resume = True
    cfg = load_config(args.config, tuple(args.overrides))  # every check runs here, before any model loads

    from svd_scale.training import run

    run(cfg, resume=args.resume)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # each rank stops its process group's watchdog before exit;
        dist.destroy_process_group()                   # no barrier: rank 0 may still be exporting alone


if __name__ == "__main__":
    main()
