#!/usr/bin/env python
"""Training throughput and peak memory, side by side in one run, on one GPU.

    python bench/train_throughput.py [--layers 32] [--seq 2048] [--steps 5] [--repeat 2] [--rows all|compile]

A Llama-2-7B-shaped model (hidden 4096, MLP 11008, 32 layers, vocab 32000) with random
weights -- speed and memory depend on shapes, not values. Every row: seq 2048, micro-batch 1,
gradient checkpointing, AdamW over the trainables, median of --steps steps after 2 warm-up
steps; peak memory is measured from just before the first training step (the model already
built, quantized and adapted), so it is the training peak.

Rows: frozen bf16 base (inputs require grad; the dequantization-free floor); frozen NF4 base
(bitsandbytes Linear4bit, its own floor); PEFT LoRA r=16 on the bf16 base; PEFT QLoRA r=16 on
the NF4 base (the real peft library, all 7 projections); svd_scale with bf16 and NF4 residual,
r in {64, 128}; each of them again with every decoder layer under ``torch.compile`` ("... compiled",
the same regional compilation for every tool). Writes bench/results/train_throughput_<device>.md
with device, date, command.
"""
import argparse
import datetime
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model.requires_grad_(False)
    return model


def to_nf4(model):
    from svd_scale.inject import _set_module, find_targets
    from svd_scale.quant.nf4 import linear4bit_from

    for name, m in find_targets(model, PROJ):
        _set_module(model, name, linear4bit_from(m, m.weight.detach().float(), torch.bfloat16, False))
    return model


def row(kind: str, layers: int):
    """(model, trainables, init seconds) for one benchmark row. A row named "... compiled" is
    that row with every decoder layer under ``torch.compile`` (the same for each tool)."""
    if kind.endswith(" compiled"):
        model, params, init = row(kind[: -len(" compiled")], layers)
        for block in (model.get_base_model() if hasattr(model, "get_base_model") else model).model.layers:
            block.compile()
        return model, params, init
    model = build(layers)
    t0 = time.time()
    if kind == "frozen bf16":
        pass
    elif kind == "frozen nf4":
        to_nf4(model)
    elif kind in ("peft lora r16", "peft qlora r16"):
        from peft import LoraConfig, get_peft_model

        if kind == "peft qlora r16":
            to_nf4(model)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PROJ))
    else:  # "svd_scale bf16 r64" etc.; "... fused" runs the layer through the ScaledLowRank function;
        # "... absolute" trains sigma itself (adapter.sigma_update=absolute) instead of the default relative form
        import svd_scale
        from svd_scale.methods.svd_scale import SVDScaleLayer

        SVDScaleLayer.fused = kind.endswith(" fused")
        _, store, r = kind.split()[:3]
        nf4 = store == "nf4"  # T=1: the init column times one SVD + quantization per weight
        svd_scale.apply(model, svd_scale.AdapterConfig(rank=int(r[1:]), target_modules=PROJ, quant="nf4" if nf4 else "none",
                                                       quant_iters=1 if nf4 else None,
                                                       options={"sigma_update": "absolute"} if kind.endswith(" absolute") else {}))
    torch.cuda.synchronize()
    init = time.time() - t0
    return model, [p for p in model.parameters() if p.requires_grad], init


def measure(kind: str, args) -> dict:
    model, params, init = row(kind, args.layers)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None
    x = torch.randint(0, 32000, (1, args.seq), device="cuda")
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(2 + args.steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
    step = statistics.median(times)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.cuda.synchronize()
        ev = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0) > 0]
        n = sum(e.count for e in ev if getattr(e, "self_device_time_total", 0) > 0)
        busy = sum(getattr(e, "self_device_time_total", 0) for e in ev) / 1e3
        print(f"--- {kind}: {n} kernel launches, {busy:.1f} ms GPU busy per fwd+bwd (wall {step * 1000:.1f} ms)")
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90)
        Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.profile_dir) / f"{kind.replace(' ', '_')}.txt").write_text(table)
    out = {"row": kind, "step_s": step, "tok_s": args.seq / step, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
           "trainable": sum(p.numel() for p in params), "init_s": init}
    print(f"{kind:24s} {out['tok_s']:9.0f} tok/s  step {step * 1000:7.1f} ms  peak {out['peak_gib']:6.2f} GiB  "
          f"trainable {out['trainable']:>12,}  init {init:6.1f} s", flush=True)
    del model, params, opt
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", default="all", help="'all', 'compile' (torch.compile rows beside eager ones) or names, comma-separated")
    ap.add_argument("--repeat", type=int, default=2, help="run every row this many times, in turn; keep each row's best")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="write the top CUDA ops/kernels of one step per row")
    ap.add_argument("--profile-dir", default="runs/profile")
    args = ap.parse_args()
    kinds = ["frozen bf16", "frozen nf4", "peft lora r16", "peft qlora r16", "svd_scale bf16 r64", "svd_scale nf4 r64",
             "svd_scale nf4 r64 fused", "svd_scale nf4 r64 absolute", "svd_scale bf16 r128", "svd_scale nf4 r128"]
    compiled = [k + " compiled" for k in kinds if not k.endswith(" fused")]
    if args.rows == "compile":  # the short torch.compile comparison: each compiled row beside its eager twin
        kinds = ["frozen bf16", "frozen nf4", "peft qlora r16", "svd_scale nf4 r64"] + \
                [k + " compiled" for k in ("frozen nf4", "peft qlora r16", "svd_scale nf4 r64")]
    elif args.rows == "all":
        kinds = kinds + compiled
    else:
        wanted = args.rows.split(",")
        unknown = sorted(set(wanted) - set(kinds) - set(compiled))
        if unknown:
            raise SystemExit(f"--rows: unknown {unknown}; known: {kinds + compiled} or 'all' or 'compile'")
        kinds = [k for k in kinds + compiled if k in wanted]
    if any(k.endswith(" compiled") for k in kinds):
        # every row recompiles the decoder layer's forward for its own module types; dynamo's
        # default limit (8 graphs per code object) would quietly drop later rows back to eager
        torch._dynamo.config.cache_size_limit = 64
        torch._dynamo.config.accumulated_cache_size_limit = 512
    # Rows run in turn, --repeat times; each row keeps its fastest median (the host's launch
    # speed drifts during a run and every row here is partly CPU-bound: best-of is the fair pick).
    results = []
    for _ in range(args.repeat):
        for k in kinds:
            r = measure(k, args)
            old = next((o for o in results if o["row"] == k), None)
            if old is None:
                results.append(r)
            elif r["tok_s"] > old["tok_s"]:
                results[results.index(old)] = r
    by = {r["row"]: r for r in results}
    q, f = by.get("peft qlora r16"), by.get("frozen bf16")  # eager PEFT QLoRA: what users run by default
    dev = torch.cuda.get_device_name()
    lines = [f"# Training throughput, Llama-2-7B shape ({args.layers} layers), seq {args.seq}, batch 1, checkpointing", "",
             f"- device: {dev}; torch {torch.__version__}; date {datetime.date.today()}",
             f"- command: `python bench/train_throughput.py {' '.join(sys.argv[1:])}`",
             f"- median of the timed steps after 2 warm-ups, best of {args.repeat} passes over the rows; "
             "peak = max allocated from the first training step on", "",
             "| row | tokens/s | vs PEFT QLoRA | vs frozen bf16 | peak GiB | trainable | init s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        vq = f"{r['tok_s'] / q['tok_s']:.2f}x" if q else "-"
        vf = f"{r['tok_s'] / f['tok_s']:.2f}x" if f else "-"
        lines.append(f"| {r['row']} | {r['tok_s']:.0f} | {vq} | {vf} | {r['peak_gib']:.2f} | {r['trainable']:,} | {r['init_s']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out or ROOT / "bench" / "results" / f"train_throughput_{dev.replace(' ', '_')}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
