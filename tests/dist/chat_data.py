"""The chat (``messages``) file the 2-rank ZeRO-3 and FSDP2 launch-path runs train on, and the arguments
their single-process reference shares with them."""
import json

WORDS = ["yes", "no", "maybe", "never", "always", "often"]
ROWS = [{"messages": [{"role": "system", "content": "Answer with one word."},
                      {"role": "user", "content": f"Say {w}, please ({i})."}, {"role": "assistant", "content": w}]}
        for i in range(5) for w in WORDS]
ARGS = ("train.max_steps=3", "eval_fraction=0.2", "train.eval_steps=3", "train.logging_steps=1", "train.max_length=64")


def write(path) -> str:
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    return str(path)
