"""Configuration as data: dataclasses with help text, validated in ``__post_init__``.

A run is one :class:`RunConfig` (``model``, ``data``, ``adapter``, ``train``), read
from a YAML file in ``configs/`` and adjusted by ``key=value`` overrides, e.g.
``adapter.rank=64 train.lr=1e-2`` or, where a field name is unique, ``rank=64``.
Every check runs here, before any model is loaded, so a typo costs seconds.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .svd import ALGORITHMS

FACTOR_DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANT_TYPES = ("none", "nf4")
SCALE_MODES = ("output", "none")
ENGINES = ("auto", "single", "deepspeed", "fsdp2")
PRECISIONS = ("fp32", "bf16")
EVAL_SPLITS = ("test", "validation")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _positive(name: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


@dataclass
class AdapterConfig:
    """Which layers get an adapter, which method, and how it is initialized."""

    method: str = field(default="svd_scale", metadata={"help": "adapter method: svd_scale, svfit, sorsa, kasa, salora, pissa, lora"})
    rank: int = field(default=64, metadata={"help": "r: singular components (or LoRA rank) per target layer"})
    target_modules: Union[str, list] = field(
        default="all-linear",
        metadata={"help": "'all-linear' (every linear layer but the output head), a list of module-name suffixes "
                  "such as [q_proj, v_proj], or a regex matched against full module names"},
    )
    svd: str = field(default="randomized", metadata={"help": "SVD algorithm: full (torch.linalg.svd) or randomized (torch.svd_lowrank)"})
    niter: int = field(default=4, metadata={"help": "power iterations of the randomized SVD"})
    oversample: int = field(default=8, metadata={"help": "extra probe vectors of the randomized SVD"})
    factor_dtype: str = field(default="auto", metadata={"help": "storage dtype of frozen U_r/V_r: auto (= base weight dtype), float32, bfloat16, float16"})
    quant: str = field(default="none", metadata={"help": "storage of the frozen residual: none (base dtype) or nf4 (bitsandbytes 4-bit)"})
    double_quant: bool = field(default=False, metadata={"help": "nf4: also quantize the block scales (bitsandbytes compress_statistics)"})
    quant_iters: Optional[int] = field(default=None, metadata={"help": "nf4: T rounds of QPiSSA-style refinement (1 = decompose W once; null = 5, the measured default)"})
    # Method-specific hyperparameters; None means the method's own default. Setting
    # one that the chosen method does not use is an error (see methods.validate_options).
    scale: Optional[str] = field(default=None, metadata={"help": "svd_scale: 'output' (per-output-channel scale s) or 'none'"})
    alpha: Optional[float] = field(default=None, metadata={"help": "lora/kasa/salora: scaling numerator (delta scaled by alpha/r)"})
    gamma: Optional[float] = field(default=None, metadata={"help": "sorsa/kasa/salora: orthogonality regularizer weight"})
    beta: Optional[float] = field(default=None, metadata={"help": "kasa: weight of ||delta_sigma||^2"})
    budget: Optional[float] = field(default=None, metadata={"help": "salora: target fraction of rank components kept (0..1]"})

    def __post_init__(self) -> None:
        from .methods import validate_options

        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ValueError(f"adapter.rank must be a positive integer, got {self.rank!r}")
        _choice("adapter.svd", self.svd, ALGORITHMS)
        _positive("adapter.niter", self.niter, allow_zero=True)
        _positive("adapter.oversample", self.oversample, allow_zero=True)
        _choice("adapter.factor_dtype", self.factor_dtype, FACTOR_DTYPES)
        _choice("adapter.quant", self.quant, QUANT_TYPES)
        if self.quant_iters is not None and (not isinstance(self.quant_iters, int) or isinstance(self.quant_iters, bool)
                                             or self.quant_iters < 1):
            raise ValueError(f"adapter.quant_iters must be an integer >= 1, got {self.quant_iters!r}")
        if self.quant_iters is not None and self.quant_iters > 1 and self.quant != "nf4":
            raise ValueError(f"adapter.quant_iters={self.quant_iters} refines a 4-bit residual: set adapter.quant=nf4")
        if not isinstance(self.target_modules, (str, list)) or not self.target_modules:
            raise ValueError(f"adapter.target_modules must be 'all-linear', a regex or a non-empty list, got {self.target_modules!r}")
        validate_options(self)

    def refine_iters(self) -> int:
        """T for the NF4 refinement: 5 unless set (bench/results/quant_error_*.md: T=5 beats T=1
        at every rank on real SmolLM2 and random 7B-shaped weights); 1 without NF4."""
        if self.quant != "nf4":
            return 1
        return 5 if self.quant_iters is None else self.quant_iters

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        return _build(cls, d, "adapter")


@dataclass
class TrainConfig:
    """The training loop (Hugging Face Trainer) and where results go."""

    output_dir: str = field(default="runs/quickstart", metadata={"help": "checkpoints, adapter and metrics go here"})
    max_steps: int = field(default=120, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "micro-batch per device"})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate (svd_scale's, chosen by bench/quality.py; see configs for others)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    scheduler: str = field(default="cosine", metadata={"help": "transformers lr_scheduler_type"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of steps of linear warm-up"})
    max_length: int = field(default=128, metadata={"help": "tokens per example (longer ones lose the start of their prompt)"})
    seed: int = field(default=0, metadata={"help": "seed for adapter init noise, data order and dropout"})
    logging_steps: int = field(default=10, metadata={"help": "log the loss every N steps"})
    save_steps: int = field(default=0, metadata={"help": "checkpoint every N steps (0: only the final adapter)"})
    precision: str = field(default="fp32", metadata={"help": "fp32, or bf16 (base in bf16; sigma/s and other trainables stay fp32)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    compile: bool = field(default=False, metadata={"help": "torch.compile every decoder layer (H100, svd_scale NF4 r=64: 1.65x "
                          "the eager tokens/s, bench/results/train_throughput_H100.md); engines single and fsdp2"})
    engine: str = field(default="auto", metadata={"help": "auto (deepspeed if train.deepspeed is set), single, deepspeed, fsdp2 (under torchrun)"})
    deepspeed: Optional[str] = field(default=None, metadata={"help": "DeepSpeed JSON config (ZeRO-3), e.g. configs/deepspeed/zero3.json"})
    eval_examples: int = field(default=300, metadata={"help": "held-out test examples scored before and after training (0: skip)"})
    eval_before: bool = field(default=True, metadata={"help": "also score the base model before training"})
    eval_split: str = field(default="test", metadata={"help": "held-out split scored: test, or validation (for tuning; built-in data only)"})

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "max_length", "logging_steps"):
            _positive(f"train.{name}", getattr(self, name))
        for name in ("weight_decay", "warmup_ratio", "save_steps", "eval_examples", "seed"):
            _positive(f"train.{name}", getattr(self, name), allow_zero=True)
        _positive("train.lr", self.lr)
        _choice("train.precision", self.precision, PRECISIONS)
        _choice("train.engine", self.engine, ENGINES)
        _choice("train.eval_split", self.eval_split, EVAL_SPLITS)
        if self.engine == "deepspeed" and not self.deepspeed:
            raise ValueError("train.engine=deepspeed needs train.deepspeed=<json config>, e.g. configs/deepspeed/zero3.json")
        if self.engine == "fsdp2" and self.deepspeed:
            raise ValueError("train.engine=fsdp2 and train.deepspeed are exclusive: drop one")
        if self.compile and self.resolved_engine() == "deepspeed":
            raise ValueError("train.compile=true is supported with engine single or fsdp2, not deepspeed: compiling "
                             "through ZeRO-3's parameter hooks is not tested yet")
        if self.deepspeed and not Path(self.deepspeed).is_file():
            raise ValueError(f"train.deepspeed: no such file {self.deepspeed!r}")

    def resolved_engine(self) -> str:
        if self.engine != "auto":
            return self.engine
        return "deepspeed" if self.deepspeed else "single"


@dataclass
class RunConfig:
    """One fine-tuning run: base model, data, adapter, training loop."""

    model: str = field(default="builtin:smollm2-135m-instruct", metadata={"help": "from_pretrained path, or builtin:smollm2-135m-instruct"})
    data: str = field(default="builtin:rotten_tomatoes", metadata={"help": "JSONL/CSV with prompt+completion (or text), or builtin:rotten_tomatoes / builtin:plot_vs_review"})
    eval_data: Optional[str] = field(default=None, metadata={"help": "held-out JSONL/CSV (built-in data brings its own fixed split)"})
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"adapter": AdapterConfig, "train": TrainConfig}


def _coerce(value: str) -> Any:
    """Parse an override's value the way YAML would (numbers, bools, lists, null)."""
    return yaml.safe_load(value) if value != "" else ""


def _build(cls, d: dict, where: str):
    d = dict(d or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {where} key(s) {unknown}; allowed: {sorted(known)}")
    if cls is TrainConfig and "lr" in d and isinstance(d["lr"], str):
        d["lr"] = float(d["lr"])
    return cls(**d)


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ValueError(f"override {item!r} is not key=value (e.g. adapter.rank=64)")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) == 1:
        name = parts[0]
        top = {f.name for f in fields(RunConfig)} - set(_SECTIONS)
        owners = [s for s, c in _SECTIONS.items() if name in {f.name for f in fields(c)}]
        if name in top:
            parts = [name]
        elif len(owners) == 1:
            parts = [owners[0], name]
        elif not owners:
            raise ValueError(f"unknown config key {name!r}; see configs/README or `launch/train.py --help-config`")
        else:
            raise ValueError(f"ambiguous key {name!r}: use one of {[o + '.' + name for o in owners]}")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {p!r} is not a section")
    node[parts[-1]] = _coerce(value)


def load_config(path: Optional[str] = None, overrides: tuple = ()) -> RunConfig:
    """Read a YAML config (or start from defaults) and apply ``key=value`` overrides."""
    raw: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {path!r} does not exist")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
    for item in overrides:
        _apply_override(raw, item)
    top_known = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(raw) - top_known)
    if unknown:
        raise ValueError(f"unknown top-level key(s) {unknown}; allowed: {sorted(top_known)}")
    kwargs = {k: v for k, v in raw.items() if k not in _SECTIONS}
    for name, cls in _SECTIONS.items():
        kwargs[name] = _build(cls, raw.get(name), name)
    return RunConfig(**kwargs)


def describe() -> str:
    """Every config key with its default and help text (for ``--help-config`` and the README)."""
    lines = []
    for section, cls in [("", RunConfig), *_SECTIONS.items()]:
        for f in fields(cls):
            if f.name in _SECTIONS:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{(section + '.') if section else ''}{f.name} = {json.dumps(default)}  # {f.metadata.get('help', '')}")
    return "\n".join(lines)
