"""Two rank faults in one 2-rank torchrun job (gloo, CPU), launched by tests/test_faults.py:

    torchrun --nproc_per_node 2 tests/dist/faults_job.py --model DIR --out DIR

1. The ranks start with different configurations (rank 1 another lr): every rank must stop before
   loading, naming the key. 2. Rank 1 is stopped (SIGSTOP, as a hung or swapped-out process) once the
   job is under way: rank 0 must end with an error within ``train.timeout_minutes`` instead of waiting
   for the 30-minute default. Each rank records what it saw (fault<phase>_rank<r>.json); the
   assertions live in the pytest file.
"""
import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from svd_scale import training  # noqa: E402
from svd_scale.config import load_config  # noqa: E402

TIMEOUT_MINUTES = 0.25


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rank, out = int(os.environ["RANK"]), Path(a.out)
    common = (f"model={a.model}", "rank=4", "train.max_steps=2", "train.batch_size=2", "train.max_length=32",
              "train.eval_examples=0", "train.engine=fsdp2", f"train.timeout_minutes={TIMEOUT_MINUTES}")
    t0 = time.time()
    try:
        training.run(load_config(None, (*common, f"train.lr={1e-2 * (rank + 1)}", f"train.output_dir={out / 'mismatch'}")))
        seen = "no error"
    except ValueError as e:
        seen = str(e)
    (out / f"fault1_rank{rank}.json").write_text(json.dumps({"error": seen, "seconds": time.time() - t0}))

    checked = training.check_same_config

    def check_then_stop(cfg):
        checked(cfg)
        if rank == 1:
            os.kill(os.getpid(), signal.SIGSTOP)  # hangs here until killed

    training.check_same_config = check_then_stop
    t0 = time.time()
    try:
        training.run(load_config(None, (*common, "train.lr=1e-2", f"train.output_dir={out / 'stopped'}")))
        seen = "no error"
    except Exception as e:  # noqa: BLE001 -- whatever the collective raises, recorded for the test
        seen = f"{type(e).__name__}: {e}"
    (out / f"fault2_rank{rank}.json").write_text(json.dumps({"error": seen[:2000], "seconds": time.time() - t0}))
    sys.exit(1)


if __name__ == "__main__":
    main()
