#!/usr/bin/env python
"""Training tokens per second with and without packing (issue 17), on one GPU.

    python bench/packing_throughput.py [--shapes smollm2,1b] [--steps 20] [--batch 8]

svd_scale r=64 (default method and rate) on Llama-shaped models built from a config with random
weights (speed depends on shapes, not values), bf16, examples of varied length as instruction data
has them (log-normal, median 256 tokens, 16..2048), the same examples for every row. Rows:

* padded micro-batches (``svd_scale.data.Collator``: right padding + attention mask), sdpa attention;
* packed (transformers' ``DataCollatorWithFlattening``: one row per micro-batch, position ids restarting
  at each example) with ``flex_attention`` -- what ``train.packing: auto`` turns on, because
  there the examples stay apart at a cost per example;
* packed with sdpa -- exact too, but through one (tokens x tokens) mask per row (why ``auto`` does not
  pack with sdpa).

Tokens/s counts real tokens only (no padding), after 3 warm-up steps; peak is
``torch.cuda.max_memory_allocated``. Writes bench/results/packing_throughput_<GPU>.md.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SHAPES = {  # hidden, intermediate, layers, heads, kv heads
    "smollm2": (576, 1536, 30, 9, 3),  # SmolLM2-135M
    "1b": (2048, 8192, 16, 32, 8),     # Llama-3.2-1B
}
ROWS = [("padded", "sdpa"), ("packed", "flex_attention"), ("packed", "sdpa")]


def lengths(n: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(torch.randn(n, generator=g) * 0.8 + torch.log(torch.tensor(256.0)))
    return [int(v) for v in x.clamp(16, 2048)]


def model_for(shape: str, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    import svd_scale

    h, i, n, heads, kv = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=49152, max_position_embeddings=4096)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16)
    return svd_scale.apply(model, svd_scale.AdapterConfig(rank=64))


def batches(lens: list, batch: int, packed: bool):
    from transformers import DataCollatorWithFlattening

    from svd_scale.data import Collator

    g = torch.Generator().manual_seed(1)
    ex = [{"input_ids": torch.randint(1, 49152, (k,), generator=g).tolist()} for k in lens]
    for e in ex:
        e["labels"] = list(e["input_ids"])
    collate = DataCollatorWithFlattening(return_position_ids=True) if packed else Collator(pad_token_id=0)
    out = []
    for s in range(0, len(ex) - batch + 1, batch):
        b = collate(ex[s:s + batch])
        out.append(({k: torch.as_tensor(v).cuda() for k, v in b.items()}, sum(lens[s:s + batch])))
    return out


def measure(shape: str, kind: str, attn: str, a) -> dict:
    model = model_for(shape, attn)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = batches(lengths(a.batch * (a.steps + 3)), a.batch, kind == "packed")
    torch.cuda.reset_peak_memory_stats()
    losses, t0, tokens = [], None, 0
    for step, (b, n) in enumerate(data):
        if step == 3:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss = model(**b, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        tokens += n if step >= 3 else 0
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    del model, opt
    torch.cuda.empty_cache()
    return {"tok_s": tokens / dt, "peak": torch.cuda.max_memory_allocated() / 2**30, "first_loss": losses[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="smollm2,1b")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    gpu = torch.cuda.get_device_name()
    lines = [f"# Training tokens/s with and without packing: {gpu}", "",
             f"- {datetime.date.today()}, `python bench/packing_throughput.py" + "".join(f" {x}" for x in sys.argv[1:]) + "`",
             f"- svd_scale r=64, bf16, random weights, micro-batch {a.batch} examples, lengths log-normal (median 256, "
             f"16..2048; mean {sum(lengths(a.batch * (a.steps + 3))) / (a.batch * (a.steps + 3)):.0f}), {a.steps} timed steps "
             "after 3 warm-up; tokens/s counts real tokens only; the first step's loss shows the rows see the same data", "",
             "| shape | batches | attention | tokens/s | vs padded | peak GiB | first loss |", "|---|---|---|---|---|---|---|"]
    for shape in a.shapes.split(","):
        base = None
        for kind, attn in ROWS:
            try:
                r = measure(shape, kind, attn, a)
            except Exception as e:  # noqa: BLE001 -- a row that cannot run is reported, not hidden
                lines.append(f"| {shape} | {kind} | {attn} | failed: {type(e).__name__}: {str(e)[:120]} | | | |")
                print(lines[-1], flush=True)
                continue
            base = base or r["tok_s"]
            lines.append(f"| {shape} | {kind} | {attn} | {r['tok_s']:,.0f} | {r['tok_s'] / base:.2f}x | {r['peak']:.2f} | "
                         f"{r['first_loss']:.4f} |")
            print(lines[-1], flush=True)
    out = ROOT / "bench" / "results" / f"packing_throughput_{gpu.split()[-1]}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
