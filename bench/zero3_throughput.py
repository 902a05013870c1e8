#!/usr/bin/env python
"""Training throughput and memory per GPU under DeepSpeed ZeRO-3: svd_scale vs PEFT QLoRA through
transformers' own path, side by side in one launch (issue 9, run 3).

    deepspeed --num_gpus N bench/zero3_throughput.py [--shape 7b|70b|tiny] [--layers L] [--seq 2048]
              [--steps 5] [--rows peft_qlora,svd_scale_nf4] [--out FILE] [--json FILE]
    python bench/zero3_throughput.py --merge A.json B.json --out FILE   # one process per row, one table

Rank 0 writes a checkpoint of the shape with random weights once (speed and memory depend on shapes,
not values; ``--layers`` shortens the model, e.g. to fit the disk). With ``--random-init`` (svd_scale rows
only; the 70B shape's 138 GB checkpoint would not fit the disk beside its load) no checkpoint is written:
the model is built from its config under ``zero.Init``, so each rank creates only its partition. Each row then loads it, adapts it,
builds the DeepSpeed engine and trains ``--steps`` timed steps after 2 warm-ups (micro-batch 1 per
GPU, seq ``--seq``, gradient checkpointing, AdamW). Rows:

- ``peft_qlora``: what PEFT's docs prescribe for QLoRA + ZeRO-3 ("Use PEFT QLoRA and DeepSpeed with
  ZeRO3"): ``from_pretrained`` with ``BitsAndBytesConfig(load_in_4bit, nf4, bnb_4bit_quant_storage=
  bfloat16)`` (transformers skips ``zero.Init`` for quantized models, so every rank loads the whole
  4-bit model and ``deepspeed.initialize`` partitions it), LoRA r=16 α=16 on all 7 projections,
  DeepSpeed ``bf16`` on.
- ``peft_lora``: the same with a bf16 base (loaded under ``zero.Init``).
- ``svd_scale_nf4`` / ``svd_scale_bf16``: svd_scale r=64 (randomized SVD, T=1), the base loaded
  partitioned under ``zero.Init``, the sharding-aware init (``ZeRO3Access``), DeepSpeed's
  ``torch_autocast`` bf16 (σ and s stay fp32), as ``launch/train.py`` runs it.

``--settings`` runs every row under each of several DeepSpeed settings in turn (one build per row and
setting), for the ZeRO-3 speed work (issue 15). A setting is ``+``-joined tokens, each optionally
``token:value``: ``shipped`` (the config below, unchanged), ``leaf`` (``deepspeed.utils.
set_z3_leaf_modules(model, [<decoder layer class>])`` before ``deepspeed.initialize``), ``gran[:1e8]``
(``stage3_module_granularity_threshold``), ``persist[:1e6]`` (``stage3_param_persistence_threshold``;
1e6 keeps the adapter's factors, sigma, s and the norms whole, the 4-bit codes of every projection
(>= 4.2 M bf16 values) partitioned), ``prefetch[:2e8]`` (``stage3_prefetch_bucket_size``), ``live[:2e9]``
(``stage3_max_live_parameters``), ``reuse[:0]`` (``stage3_max_reuse_distance``: DeepSpeed keeps a
gathered parameter that its trace reuses within this many values, 1e9 by default; alone it did not lower the
7B peak, the prefetch bucket did, see bench/results/zero3_memory_H200x4.md), ``mpersist[:4e9]`` (``stage3_model_persistence_threshold``: at most
this many values persistent in all; with ``persist:2e7`` the 4-bit codes of a 7B model (about 1.6e9 bf16 values)
stay whole on every rank), ``mel[:0]`` (``memory_efficient_linear``: 0 keeps torch's own ``F.linear``
instead of DeepSpeed's Python autograd wrapper), ``whole[:1000]`` (svd_scale rows: the frozen residuals of the first layers totalling at most that many GiB kept whole
on every rank, outside ZeRO-3, ``ZeRO3Access(replicate_residual_gib=...)``; the launch path's default is a quarter of
the GPU's memory; without the token every residual is partitioned), ``norepl`` (svd_scale rows: the adapters' frozen U, V, sigma0 stay
ZeRO-3 parameters instead of whole buffers, ``ZeRO3Access(replicate_frozen_gib=0)``), ``compile`` (``torch.compile``
each decoder layer's ``forward`` after ``deepspeed.initialize``: DeepSpeed's fetch/release hooks, which
run around ``forward`` in ``Module.__call__``, stay eager; with ``leaf`` nothing inside a layer is hooked; add ``mel`` with it, as train.compile does: DeepSpeed's ``F.linear`` wrapper makes dynamo guard on each
weight's ``ds_id``, so PEFT's LoRA layers recompiled per decoder layer and fell back to eager after 8), ``stream``
(``svd_scale_nf4`` rows: built while loading, ``svd_scale.engines.zero3.load_partitioned``, as the launch path
builds an NF4 residual: no dense target weight is loaded; with ``--random-init`` each tensor is drawn when read); e.g. ``--settings shipped,leaf,gran,leaf+persist,leaf+persist+prefetch+live``.
``--profile SETTING`` adds, for that setting, one torch.profiler step and one cProfile step on rank 0
after the timed ones (tables to ``--profile-dir``); ``--memory SETTING[,SETTING]`` one step with CUDA's
allocator history on rank 0: what was live at the step's peak, by allocation site (``mem_*.md`` there).

Per row (max over ranks): load + adapt seconds, peak GiB during load + adapt, peak GiB during
training, parameter GiB held by the rank after ``deepspeed.initialize``; tokens/s per GPU (median
step). On CPU (``DS_ACCELERATOR=cpu``, gloo) it runs as a smoke test: no peak memory figures.
Results table to ``--out`` (default ``bench/results/zero3_throughput_<device>x<N>.md``).
"""
import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import deepspeed  # noqa: E402
from svd_scale.engines.zero3 import restore_torch_linear  # noqa: E402
import torch.distributed as dist  # noqa: E402

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {  # Llama-2-7B, Llama-2-70B (GQA, 8 KV heads), and a CPU smoke-test shape
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=32000),
}
ROWS = ("peft_qlora", "svd_scale_nf4", "peft_lora", "svd_scale_bf16")
LABEL = {"peft_qlora": "PEFT QLoRA r=16 (transformers 4-bit path)", "peft_lora": "PEFT LoRA r=16, bf16 base",
         "svd_scale_nf4": "svd_scale r=64, NF4 residual", "svd_scale_bf16": "svd_scale r=64, bf16 residual"}


def write_checkpoint(path: Path, shape: str, layers: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").is_file():
        return
    cfg = LlamaConfig(**{**SHAPES[shape], "num_hidden_layers": layers}, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init is slow on CPU at 7B
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


SETTING_DEFAULTS = {"shipped": None, "leaf": None, "gran": 1e8, "persist": 1e6, "prefetch": 2e8, "live": 2e9,
                    "mpersist": 4e9, "mel": 0, "norepl": None, "compile": None, "reuse": 0,
                    "whole": 1000, "stream": None}
SETTING_KEYS = {"gran": "stage3_module_granularity_threshold", "persist": "stage3_param_persistence_threshold",
                "reuse": "stage3_max_reuse_distance",
                "prefetch": "stage3_prefetch_bucket_size", "live": "stage3_max_live_parameters",
                "mpersist": "stage3_model_persistence_threshold", "mel": "memory_efficient_linear"}


def parse_setting(setting: str) -> dict:
    """``"leaf+persist:1e6"`` -> ``{"leaf": None, "persist": 1000000}`` (see the module docstring)."""
    out = {}
    for tok in setting.split("+"):
        name, _, val = tok.partition(":")
        if name not in SETTING_DEFAULTS:
            raise SystemExit(f"--settings: unknown token {name!r} in {setting!r}; known: {', '.join(SETTING_DEFAULTS)}")
        v = float(val) if val else SETTING_DEFAULTS[name]
        out[name] = None if v is None else int(v)
    return out


def ds_config(row: str, hidden: int, setting: str = "shipped") -> dict:
    """The ZeRO-3 config of configs/deepspeed/zero3.json with its "auto" sizes filled in as
    transformers' Trainer fills them (integrations/deepspeed.py), so both tools get what users get;
    then the DeepSpeed options of ``setting`` (``parse_setting``) on top."""
    zero = {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": hidden * hidden,
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden), "stage3_param_persistence_threshold": 10 * hidden}
    for name, v in parse_setting(setting).items():
        if name == "mel":
            zero[SETTING_KEYS[name]] = bool(v)
        elif name in SETTING_KEYS:
            zero[SETTING_KEYS[name]] = v
    cfg = {"zero_optimization": zero,
           "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
           "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "wall_clock_breakdown": False}
    if row.startswith("peft"):
        cfg["bf16"] = {"enabled": True}  # PEFT's documented config (accelerate's bf16 mixed precision)
    else:
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}  # what svd_scale.training uses
    return cfg


def build(row: str, path, ds: dict, setting: str = "shipped"):
    """The model of ``row``, adapted, before ``deepspeed.initialize``. ``path``: the checkpoint, or a
    ``LlamaConfig`` to build a randomly initialized model from (``--random-init``)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from svd_scale.engines.zero3 import zero3_loading

    if row.startswith("peft"):
        from peft import LoraConfig, get_peft_model
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds)  # noqa: F841  (transformers' ZeRO-3 switch, alive while loading)
        kw = {}
        if row == "peft_qlora":
            kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16,
                                                           bnb_4bit_quant_storage=torch.bfloat16)
            # no device_map: transformers refuses one under ZeRO-3 and places the 4-bit model itself
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, **kw)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=PROJ,
                                                 task_type="CAUSAL_LM"))
        return model
    import svd_scale
    from svd_scale.engines.zero3 import ZeRO3Access, build_partitioned, load_partitioned, meta_skeleton

    cfg = svd_scale.AdapterConfig(method="svd_scale", rank=64, svd="randomized",
                                  quant="nf4" if row == "svd_scale_nf4" else "none", quant_iters=1)
    tokens = parse_setting(setting)
    # norepl: U, V, sigma0 stay ZeRO-3 parameters. whole[:GiB]: the frozen residuals of the first layers totalling
    # GiB kept whole on every rank (the launch path's default: a quarter of the GPU); without it every residual is
    # partitioned, as before that default
    options = dict(replicate_frozen_gib=0.0 if "norepl" in tokens else 2.0, replicate_residual_gib=tokens.get("whole", 0))
    if "stream" in tokens:  # the launch path's NF4 loader: no dense target weight is ever loaded
        if row != "svd_scale_nf4":
            raise SystemExit("the stream token builds a quantized residual while loading: svd_scale_nf4 rows only")
        if isinstance(path, Path):
            return load_partitioned(str(path), cfg, ds, torch.bfloat16, **options)
        model = meta_skeleton(path, torch.bfloat16)
        return build_partitioned(model, RandomTensors(model), cfg, ds, **options)
    with zero3_loading(ds, torch.bfloat16):
        if isinstance(path, Path):
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16)
        else:  # partitioned as it is built (transformers enters zero.Init for from_config too)
            model = AutoModelForCausalLM.from_config(path, dtype=torch.bfloat16)
    return svd_scale.apply(model, cfg, access=ZeRO3Access(ds_config=ds, **options))


class RandomTensors:
    """``--random-init`` with ``stream``: each checkpoint tensor drawn when it is read (normal, std 0.02, as
    transformers initializes Llama; norms 1), seeded by its key, so every rank draws the same values."""

    def __init__(self, skeleton):
        self.shapes = {n: tuple(p.shape) for n, p in skeleton.named_parameters()}

    def missing(self, keys):
        return sorted(k for k in set(keys) if k not in self.shapes)

    def shape(self, key):
        return self.shapes[key]

    def __call__(self, key: str) -> torch.Tensor:
        import zlib

        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        if key.endswith("norm.weight"):
            return torch.ones(self.shapes[key], dtype=torch.bfloat16, device=dev)
        g = torch.Generator(device=dev).manual_seed(zlib.crc32(key.encode()))
        return (torch.randn(self.shapes[key], generator=g, device=dev) * 0.02).to(torch.bfloat16)


def _peak(cuda: bool) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")


def _reset(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _max(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def local_param_gib(model) -> float:
    n = 0
    for p in model.parameters():
        t = p.ds_tensor if hasattr(p, "ds_tensor") else p
        n += t.numel() * t.element_size()
    return n / 2**30


def _now(cuda: bool) -> float:
    return torch.cuda.memory_allocated() / 2**30 if cuda else float("nan")


def decoder_layer_classes(model) -> list:
    """The decoder layer class(es) of ``model`` (LlamaDecoderLayer here), PEFT-wrapped or not."""
    return sorted({type(m) for m in model.modules() if type(m).__name__.endswith("DecoderLayer")}, key=lambda c: c.__name__)


def leaf_summary(model) -> str:
    """Which modules DeepSpeed treats as ZeRO-3 leaves (set by ``leaf`` or by the granularity threshold)."""
    from collections import Counter

    from deepspeed.utils import z3_leaf_module

    c = Counter(type(m).__name__ for m in model.modules() if z3_leaf_module(m))
    return ", ".join(f"{k} x{v}" for k, v in sorted(c.items())) or "none"


def profile_step(step, name: str, setting: str, out_dir: str, cuda: bool, step_s: float) -> None:
    """One torch.profiler step and one cProfile step on rank 0 (every rank runs both steps)."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    rank = dist.get_rank()
    tag = f"{name}__{setting.replace('+', '_').replace(':', '')}"
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if rank == 0:
        with profile(activities=acts) as prof:
            t = time.perf_counter()
            step()
            wall = time.perf_counter() - t
    else:
        step()
    dist.barrier()
    if rank == 0:
        ka = prof.key_averages()
        dev_attr = "self_device_time_total" if hasattr(next(iter(ka)), "self_device_time_total") else "self_cuda_time_total"
        lines = [f"# {tag}: one step under torch.profiler on rank 0 (wall {wall * 1e3:.0f} ms profiled; "
                 f"{step_s * 1e3:.0f} ms median unprofiled)", ""]
        tot_cpu = sum(e.self_cpu_time_total for e in ka) / 1e3
        tot_dev = sum(getattr(e, dev_attr, 0) for e in ka) / 1e3
        launches = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"))
        lines.append(f"total self CPU {tot_cpu:.0f} ms; total self CUDA {tot_dev:.0f} ms; kernel launches {launches}")
        for pat, label in (("allgather|all_gather", "all-gather"), ("reducescatter|reduce_scatter", "reduce-scatter"),
                           ("allreduce|all_reduce", "all-reduce"), ("broadcast", "broadcast")):
            import re

            ev = [e for e in ka if re.search(pat, e.key.replace(" ", ""), re.I)]
            for e in sorted(ev, key=lambda e: -e.count):
                lines.append(f"- {label}: `{e.key[:90]}` calls {e.count}, self CPU {e.self_cpu_time_total / 1e3:.1f} ms, "
                             f"self CUDA {getattr(e, dev_attr, 0) / 1e3:.1f} ms")
        lines += ["", "## top 30 by self CPU time", "```",
                  ka.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70), "```"]
        if cuda:
            lines += ["", "## top 30 by self CUDA time", "```",
                      ka.table(sort_by=dev_attr, row_limit=30, max_name_column_width=70), "```"]
        (d / f"prof_{tag}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines[:14]), flush=True)
    # cProfile: where the host's Python time goes (DeepSpeed's hooks, the adapter's forward, autocast)
    if rank == 0:
        pr = cProfile.Profile()
        pr.enable()
        step()
        pr.disable()
        buf = io.StringIO()
        st = pstats.Stats(pr, stream=buf)
        st.sort_stats("tottime").print_stats(40)
        st.sort_stats("cumulative").print_stats(60)
        (d / f"cprof_{tag}.txt").write_text(buf.getvalue())
    else:
        step()
    dist.barrier()


SITE_LIBS = ("svd_scale/", "deepspeed/", "transformers/", "peft/", "bitsandbytes/", "bench/")


def _site(frames: list, depth: int = 4) -> str:
    """Where an allocation came from: the ``depth`` innermost frames in svd_scale, DeepSpeed, transformers,
    PEFT, bitsandbytes, inductor's generated code or this bench (torch's own frames and DeepSpeed's nvtx
    wrapper skipped), innermost first."""
    out = []
    for f in frames:
        fn = f.get("filename", "")
        if "torchinductor" in fn:
            out.append("inductor generated code")
        elif any(lib in fn for lib in SITE_LIBS) and not fn.endswith("utils/nvtx.py"):
            short = fn.split("site-packages/")[-1] if "site-packages/" in fn else "/".join(fn.split("/")[-2:])
            out.append(f"{short}:{f.get('line')} {f.get('name')}")
        if len(out) == depth:
            break
    return " < ".join(out) or "other (" + (frames[0].get("name", "?") if frames else "no frames") + ")"


def _mark() -> None:
    """A phase marker in the allocator history: a 1-value allocation from a frame named ``_mark``."""
    torch.empty(1, device="cuda")


def memory_step(step, model_params, name: str, setting: str, out_dir: str) -> dict:
    """One step with CUDA's allocator history on (rank 0; every rank runs the step): replays the allocations
    and frees to find the step's peak, and writes what was live then, grouped by allocation site, to
    ``mem_<row>__<setting>.md``. Blocks allocated before the step (shards, buffers) count as one group."""
    rank = dist.get_rank()
    tag = f"{name}__{setting.replace('+', '_').replace(':', '')}"
    if rank != 0:
        step()
        dist.barrier()
        return {}
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python", max_entries=2_000_000)
    phases = []

    def mark(label):
        phases.append(label)
        _mark()
        if label == "after forward":  # what DeepSpeed holds gathered between forward and backward
            from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

            held = [p for p in model_params() if getattr(p, "ds_status", None) == ZeroParamStatus.AVAILABLE
                    and not getattr(p, "ds_persist", False)]
            phases[-1] += f" (DeepSpeed holds {len(held)} non-persistent parameters gathered, " \
                          f"{sum(p.ds_numel * p.element_size() for p in held) / 2**30:.2f} GiB)"

    step(mark)
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak_torch = torch.cuda.max_memory_allocated()
    dist.barrier()
    try:
        return _memory_summary(snap, base, peak_torch, tag, out_dir, phases)
    except Exception as e:  # a summary bug must not leave the other ranks waiting
        print(f"memory summary failed: {e!r}", flush=True)
        return {}


def _memory_summary(snap: dict, base: int, peak_torch: int, tag: str, out_dir: str, phases: list) -> dict:
    events = snap["device_traces"][torch.cuda.current_device()]
    cur, peak, peak_i, marks = base, base, -1, []
    for i, e in enumerate(events):  # pass 1: when the step peaked
        if e["action"] == "alloc" and any(f.get("name") == "_mark" for f in e.get("frames", [])[:6]):
            marks.append((i, cur))
        if e["action"] in ("alloc", "free_completed"):
            cur += e["size"] if e["action"] == "alloc" else -e["size"]
            if cur > peak:
                peak, peak_i = cur, i
    live, freed = {}, 0
    for e in events[:peak_i + 1]:  # pass 2: what was live then
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_completed" and live.pop(e["addr"], None) is None:
            freed += e["size"]  # a block from before the step
    from collections import defaultdict

    groups = defaultdict(lambda: [0, 0])
    groups["allocated before the step, still live"] = [base - freed, 0]
    for e in live.values():
        g = groups[_site(e.get("frames", []))]
        g[0] += e["size"]
        g[1] += 1
    gib = 2**30
    lines = [f"# {tag}: what was live at the step's peak (rank 0)", "",
             f"- allocated before the step: {base / gib:.2f} GiB; replayed peak {peak / gib:.2f} GiB "
             f"(torch max_memory_allocated {peak_torch / gib:.2f} GiB) at allocator event {peak_i} of {len(events)}"]
    if len(marks) == len(phases):
        lines += [f"- {label}: event {i}, {c / gib:.2f} GiB allocated" for label, (i, c) in zip(phases, marks)]
    else:
        lines += [f"- phase markers: {len(marks)} found for {len(phases)} phases ({', '.join(phases)}); not placed"]
    lines += ["",
             "| GiB | blocks | allocation site (innermost svd_scale/DeepSpeed/transformers/PEFT/bnb frame) |", "|---|---|---|"]
    for site, (size, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:30]:
        lines.append(f"| {size / gib:.3f} | {n} | `{site}` |")
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"mem_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:26]), flush=True)
    return {"mem_peak_gib": peak / gib, "mem_base_gib": base / gib}


def row(name: str, path, seq: int, steps: int, cuda: bool, hidden: int, setting: str = "shipped",
        profile_dir: str | None = None, memory_dir: str | None = None) -> dict:
    ds = ds_config(name, hidden, setting)
    restore_torch_linear()  # each row under its own setting: DeepSpeed never resets its F.linear override
    _reset(cuda)
    before = _max(_now(cuda))  # what earlier rows left behind (0 when each row has its own process)
    dist.barrier()
    t0 = time.perf_counter()
    model = build(name, path, ds, setting)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()  # from_pretrained returns eval mode, where transformers skips the checkpointing
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    if "leaf" in parse_setting(setting):
        deepspeed.utils.set_z3_leaf_modules(model, decoder_layer_classes(model))
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    if "compile" in parse_setting(setting):
        classes = tuple(decoder_layer_classes(model))
        for layer in model.modules():
            if isinstance(layer, classes):
                layer.forward = torch.compile(layer.forward)
    dist.barrier()
    four_bit = sum(1 for m in model.modules()  # bitsandbytes' own layers (PEFT's wrappers around them not counted)
                   if type(m).__module__.startswith("bitsandbytes") and type(m).__name__ == "Linear4bit"
                   or type(m).__name__ == "ShardableNF4Linear")
    out = {"row": name, "setting": setting, "leaves": leaf_summary(model),
           "deepspeed_linear": torch.nn.functional.linear.__name__ != "linear",
           "persistent": [sum(1 for p in model.parameters() if getattr(p, "ds_persist", False)),
                          sum(p.ds_numel for p in model.parameters() if getattr(p, "ds_persist", False))], "init_s": _max(time.perf_counter() - t0), "init_peak_gib": _max(_peak(cuda)), "four_bit_layers": four_bit,
           "before_gib": before, "resident_gib": _max(_now(cuda)),
           "local_param_gib": _max(local_param_gib(model)),
           "trainable": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainable)}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    dev = engine.device
    g = torch.Generator().manual_seed(dist.get_rank())
    times, losses = [], []
    def step(mark=lambda label: None):
        x = torch.randint(0, 32000, (1, seq), generator=g).to(dev)
        loss = engine(input_ids=x, labels=x).loss
        mark("after forward")
        engine.backward(loss)
        mark("after backward")
        engine.step()
        mark("after optimizer step")
        if cuda:
            torch.cuda.synchronize()
        return loss.item()

    for i in range(2 + steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        losses.append(step())
        if i >= 2:
            times.append(time.perf_counter() - t)
    out["step_s"] = [_max(t) for t in times]  # each step's slowest rank
    out["tok_s_per_gpu"] = seq / _max(statistics.median(times))  # the slowest rank sets the pace
    out["train_peak_gib"] = _max(_peak(cuda))
    if profile_dir is not None:
        profile_step(step, name, setting, profile_dir, cuda, statistics.median(times))
    if memory_dir is not None and cuda:
        out.update(memory_step(step, model.parameters, name, setting, memory_dir))
    if not all(l == l and abs(l) < 1e4 for l in losses):
        raise RuntimeError(f"{name}: non-finite or exploding loss {losses}")
    engine.destroy()
    del engine, model, opt, trainable
    _reset(cuda)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", default="peft_qlora,svd_scale_nf4")
    ap.add_argument("--ckpt", default="/tmp/svd_scale_zero3_bench")
    ap.add_argument("--random-init", action="store_true",
                    help="svd_scale rows only: build the model from its config under zero.Init, no checkpoint")
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None, help="also write the rows' figures here")
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--merge", nargs="+", default=None, help="only write the table of these --json files")
    ap.add_argument("--settings", default="shipped",
                    help="comma-separated DeepSpeed settings, each '+'-joined tokens (see the module docstring); "
                         "every row runs under each, settings outermost")
    ap.add_argument("--profile", default=None, help="profile one extra step of every row under this setting (rank 0)")
    ap.add_argument("--profile-dir", default="runs/zero3_profile")
    ap.add_argument("--memory", default=None,
                    help="under these settings (comma-separated), one extra step of every row with CUDA's allocator history (rank 0): "
                         "what is live at the step's peak, by allocation site, to --profile-dir/mem_*.md")
    ap.add_argument("--plan", default=None,
                    help="explicit order instead of --rows x --settings: comma-separated ROW@SETTING, e.g. "
                         "'svd_scale_nf4@leaf+persist:0,peft_qlora@leaf+persist:0,svd_scale_nf4@leaf+persist:0' "
                         "(--profile then applies only to the first row of each tool under that setting)")
    a = ap.parse_args()
    if a.merge:
        return report([r for f in a.merge for r in json.loads(Path(f).read_text())], a.out or "/dev/stdout")
    if a.plan:
        plan = [tuple(x.split("@", 1)) for x in a.plan.split(",")]
        if any(len(x) != 2 for x in plan):
            raise SystemExit("--plan: each entry is ROW@SETTING")
    else:
        plan = [(r, st) for st in a.settings.split(",") for r in a.rows.split(",")]
    rows = sorted({r for r, _ in plan})
    for _, st in plan:
        parse_setting(st)
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise SystemExit(f"--rows: unknown {bad}; allowed: {', '.join(ROWS)}")
    layers = a.layers or SHAPES[a.shape]["num_hidden_layers"]
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if a.random_init:
        from transformers import LlamaConfig

        if any(r.startswith("peft") for r in rows):
            raise SystemExit("--random-init: PEFT rows load through from_pretrained (transformers' 4-bit path) and need "
                             "a checkpoint; drop them or the flag")
        torch.manual_seed(0)
        path = LlamaConfig(**{**SHAPES[a.shape], "num_hidden_layers": layers}, max_position_embeddings=4096)
    else:
        path = Path(f"{a.ckpt}_{a.shape}_{layers}l")
    if rank == 0 and not a.random_init:
        write_checkpoint(path, a.shape, layers)
    dist.barrier()
    results, profiled = [], set()
    for r, st in plan:
        prof = a.profile == st and (r, st) not in profiled
        profiled.add((r, st))
        res = row(r, path, a.seq, a.steps, cuda, SHAPES[a.shape]["hidden_size"], st,
                  a.profile_dir if prof else None, a.profile_dir if a.memory and st in a.memory.split(",") else None)
        if rank == 0:
            print(f"RESULT {st:32s} {r:16s} {res['tok_s_per_gpu']:8,.0f} tok/s/GPU  train peak {res['train_peak_gib']:.2f} GiB  "
                  f"init {res['init_s']:.1f} s  persistent {res['persistent']}  ds-linear {res['deepspeed_linear']}  steps {[round(x, 3) for x in res['step_s']]}  leaves: {res['leaves']}", flush=True)
        results.append(res)
        if a.json and rank == 0:  # partial results survive a run cut short
            Path(a.json).write_text(json.dumps(results))
    if rank != 0:
        return
    meta = {"shape": a.shape, "layers": layers, "world": world, "seq": a.seq, "steps": a.steps,
            "device": torch.cuda.get_device_name() if cuda else "CPU (gloo; no memory figures)",
            "versions": f"torch {torch.__version__}, deepspeed {deepspeed.__version__}", "date": str(datetime.date.today()),
            "command": "deepspeed --num_gpus {} bench/zero3_throughput.py {}".format(
                world, " ".join(x for x in sys.argv[1:] if not x.startswith("--local_rank")))}
    results = [{**meta, **r} for r in results]
    if a.json:
        Path(a.json).write_text(json.dumps(results))
    tag = (meta["device"].split()[-1] if cuda else "cpu") + f"x{world}"
    report(results, a.out or str(ROOT / "bench" / "results" / f"zero3_throughput_{tag}.md"))


def report(results: list, out: str) -> None:
    """The table of ``results`` (rows of one launch, or of one launch per row via --merge)."""
    m = results[0]
    ref = next((r for r in results if r["row"] == "peft_qlora"), None)
    cmds = sorted({r["command"] for r in results})
    lines = [f"# ZeRO-3 training throughput and memory per GPU: {m['shape']} shape ({m['layers']} layers), {m['world']} rank(s)", "",
             f"- device: {m['world']} x {m['device']}; {m['versions']}; date {m['date']}",
             "- command" + ("s (one process per row)" if len(cmds) > 1 else "") + ": " + "; ".join(f"`{c}`" for c in cmds),
             f"- seq {m['seq']}, micro-batch 1 per GPU, gradient checkpointing, AdamW; median of {m['steps']} steps after 2 "
             "warm-ups; every figure is the maximum over ranks", "",
             "| row | trainable | 4-bit layers | tokens/s per GPU | vs PEFT QLoRA | train peak GiB | load+adapt peak GiB "
             "| params GiB per rank | resident GiB after init | left by earlier rows GiB | load+adapt s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{r['tok_s_per_gpu'] / ref['tok_s_per_gpu']:.2f}x" if ref else "-"
        label = LABEL[r['row']] + ("" if r.get("setting", "shipped") == "shipped" else f" [{r['setting']}]")
        lines.append(f"| {label} | {r['trainable']:,} | {r['four_bit_layers']} | {r['tok_s_per_gpu']:,.0f} | {ratio} | "
                     f"{r['train_peak_gib']:.2f} | {r['init_peak_gib']:.2f} | {r['local_param_gib']:.2f} | {r['resident_gib']:.2f} | "
                     f"{r['before_gib']:.2f} | {r['init_s']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(out).write_text(text)


if __name__ == "__main__":
    main()
