"""Configuration as data: dataclasses with help text, validated in ``__post_init__``.

A run is one :class:`RunConfig` (``model``, ``data``, ``adapter``, ``train``), read
from a YAML file in ``configs/`` and adjusted by ``key=value`` overrides, e.g.
``adapter.rank=64 train.lr=1e-2`` or, where a field name is unique, ``rank=64``.
Every check runs here, before any model is loaded, so a typo costs seconds.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .svd import ALGORITHMS

FACTOR_DTYPES = ("auto", "float32", "bfloat16", "float16")
ENGINES = ["auto", "single", "deepspeed", "fsdp2"]  # svd_scale.engines.register_engine adds more
PRECISIONS = ("fp32", "bf16")
EVAL_SPLITS = ("test", "validation")
EXPORTS = ("none", "peft", "merged")
NAN_POLICIES = ("stop", "skip")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _typed(obj, section: str) -> None:
    """Check (and, for numbers written as strings, convert) every field against its annotation, so a
    quoted ``"false"`` is not taken as true, ``max_steps: 2.7`` is not cut to 2, and ``1e-2`` (a string
    in YAML 1.1) is the number 0.01. Raised before anything is loaded, naming the key."""
    for f in fields(obj):
        kind, value, key = str(f.type), getattr(obj, f.name), f"{section}.{f.name}" if section else f.name
        if value is None and kind.startswith("Optional"):
            continue
        if "bool" in kind:
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be true or false (unquoted), got {value!r}")
        elif "int" in kind:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{key} must be a whole number, got {value!r}")
        elif "float" in kind:
            number = _number_or_same(value)
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
                raise ValueError(f"{key} must be a finite number, got {value!r}")
            setattr(obj, f.name, float(number))
        elif kind == "dict" and not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping (key: value lines), got {value!r}")
        elif kind in ("str", "Optional[str]"):
            if isinstance(value, os.PathLike) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
                setattr(obj, f.name, os.fspath(value) if isinstance(value, os.PathLike) else str(value))
            elif not isinstance(value, str):
                raise ValueError(f"{key} must be a string, got {value!r}")


# Hugging Face TrainingArguments names accepted for the train keys they mean (as axolotl/TRL users write them)
TRAIN_ALIASES = {"learning_rate": "lr", "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps":
                 "grad_accum", "lr_scheduler_type": "scheduler", "num_train_epochs": "num_epochs",
                 "activation_checkpointing": "gradient_checkpointing"}
# TrainingArguments that svd_scale derives from its own keys: not settable through train.hf_args
SET_BY_TRAIN = {**TRAIN_ALIASES, **{k: k for k in ("max_steps", "output_dir", "weight_decay", "warmup_ratio", "seed",
                                                   "logging_steps", "save_steps", "gradient_checkpointing", "deepspeed",
                                                   "report_to", "run_name", "eval_steps")},
                "bf16": "precision", "fp16": "precision", "ddp_timeout": "timeout_minutes", "warmup_steps": "warmup_ratio"}


def _check_hf_args(hf_args: dict) -> None:
    """Keys of ``train.hf_args`` must be TrainingArguments fields; the ones svd_scale sets from its own keys
    are pointed to those (one place per setting)."""
    if not hf_args:
        return
    import dataclasses as dc

    from transformers import TrainingArguments

    known = {f.name for f in dc.fields(TrainingArguments)}
    for k in hf_args:
        if k not in known:
            raise ValueError(f"train.hf_args: {k!r} is not a transformers.TrainingArguments field")
        if k in SET_BY_TRAIN:
            raise ValueError(f"train.hf_args: {k!r} is set by svd_scale from train.{SET_BY_TRAIN[k]}; set that instead")


def _number_or_same(value: Any) -> Any:
    """A method option written as ``1e-3`` (a string to YAML 1.1) is the number; other values unchanged."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


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
    quant: str = field(default="none", metadata={"help": "storage of the frozen residual: none (base dtype) or nf4 (bitsandbytes 4-bit); see svd_scale.quant"})
    double_quant: bool = field(default=False, metadata={"help": "nf4: also quantize the block scales (bitsandbytes compress_statistics)"})
    quant_iters: Optional[int] = field(default=None, metadata={"help": "nf4: T rounds of QPiSSA-style refinement (1 = decompose W once; null = 5, the measured default)"})
    # Method options (``adapter.alpha``, ``adapter.gamma``, ...) are declared by each method's file
    # (``AdapterLayer.options``); they are given as keyword arguments or keys and kept here.
    # Unset means the method's own default; one the chosen method does not declare is an error.
    options: dict = field(default_factory=dict, metadata={"help": "method options (see the adapter.<option> lines)"})

    def __post_init__(self) -> None:
        from .methods import validate_options
        from .quant import storage_names

        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ValueError(f"adapter.rank must be a positive integer, got {self.rank!r}")
        _typed(self, "adapter")
        _choice("adapter.svd", self.svd, ALGORITHMS)
        _positive("adapter.niter", self.niter, allow_zero=True)
        _positive("adapter.oversample", self.oversample, allow_zero=True)
        _choice("adapter.factor_dtype", self.factor_dtype, FACTOR_DTYPES)
        _choice("adapter.quant", self.quant, storage_names())
        if self.quant_iters is not None and (not isinstance(self.quant_iters, int) or isinstance(self.quant_iters, bool)
                                             or self.quant_iters < 1):
            raise ValueError(f"adapter.quant_iters must be an integer >= 1, got {self.quant_iters!r}")
        if self.quant_iters is not None and self.quant_iters > 1 and not self.storage().refines:
            raise ValueError(f"adapter.quant_iters={self.quant_iters} refines a quantized residual: "
                             f"adapter.quant={self.quant!r} is not quantized (use e.g. nf4)")
        if not isinstance(self.target_modules, (str, list)) or not self.target_modules:
            raise ValueError(f"adapter.target_modules must be 'all-linear', a regex or a non-empty list, got {self.target_modules!r}")
        self.options = {k: _number_or_same(v) for k, v in dict(self.options or {}).items() if v is not None}
        validate_options(self.method, self.options)

    def __getattr__(self, name: str):
        """``cfg.alpha`` etc.: a method option's value as set (None when unset)."""
        if name.startswith("__") or name == "options":
            raise AttributeError(name)
        from .methods import option_users

        if name in option_users():
            return self.options.get(name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def method_options(self) -> dict:
        """The chosen method's options with its defaults filled in."""
        from .methods import resolve_options

        return resolve_options(self.method, self.options)

    def storage(self):
        """The residual storage strategy named by ``quant`` (svd_scale.quant)."""
        from .quant import get_storage

        return get_storage(self.quant, double_quant=self.double_quant)

    def refine_iters(self) -> int:
        """T for the quantized residual's refinement (the storage's default unless set); 1 unquantized."""
        if not self.storage().refines:
            return 1
        return self.storage().default_refine_iters if self.quant_iters is None else self.quant_iters

    def to_dict(self) -> dict:
        """Flat: method options stand beside the other keys, as in a YAML config."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}
        return copy.deepcopy({**d, **self.options})

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        return _build(cls, d, "adapter")


_generated_init = AdapterConfig.__init__


def _adapter_init(self, *args, options: Optional[dict] = None, **kwargs) -> None:
    """Accept method options as keyword arguments: ``AdapterConfig(method="lora", alpha=16)``."""
    known = {f.name for f in fields(AdapterConfig)}
    opts = dict(options or {})
    opts.update({k: kwargs.pop(k) for k in list(kwargs) if k not in known})
    _generated_init(self, *args, options=opts, **kwargs)


AdapterConfig.__init__ = _adapter_init


@dataclass
class TrainConfig:
    """The training loop (Hugging Face Trainer) and where results go."""

    output_dir: str = field(default="runs/quickstart", metadata={"help": "checkpoints, adapter and metrics go here"})
    max_steps: int = field(default=120, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "micro-batch per device"})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    lr: Optional[float] = field(default=None, metadata={"help": "peak learning rate; null: the method's default_lr "
                                "(svd_scale 1e-2 ... chosen by bench/quality.py, see docs/methods.md)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    scheduler: str = field(default="cosine", metadata={"help": "transformers lr_scheduler_type"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of steps of linear warm-up"})
    max_length: int = field(default=128, metadata={"help": "tokens per example (longer ones lose the start of their prompt)"})
    seed: int = field(default=0, metadata={"help": "seed for adapter init noise, data order and dropout"})
    logging_steps: int = field(default=10, metadata={"help": "log the loss every N steps"})
    save_steps: int = field(default=0, metadata={"help": "checkpoint every N steps (0: only the final adapter)"})
    precision: str = field(default="fp32", metadata={"help": "fp32, or bf16 (base in bf16; sigma/s and other trainables stay fp32)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    compile: str = field(default="auto", metadata={"help": "torch.compile every decoder layer: true, false, or auto (on with a "
                         "CUDA GPU, eager on CPU). Measured: 1.65x the eager tokens/s on one H100; 1.53x through launch/train.py under "
                         "ZeRO-3 on 4 H200s, 1.33-1.51x in the bench, both with the 2e8 prefetch shipped then (bench/results/train_throughput_H100.md, "
                         "zero3_compile_H200x4.md); under DeepSpeed it needs ZeRO-3 and gradient_checkpointing (auto stays "
                         "eager without them)"})
    engine: str = field(default="auto", metadata={"help": "auto (deepspeed if train.deepspeed is set), single, deepspeed, fsdp2 (under torchrun)"})
    deepspeed: Optional[str] = field(default=None, metadata={"help": "DeepSpeed JSON config (ZeRO-3), e.g. configs/deepspeed/zero3.json"})
    zero3_replicate_frozen_gib: Optional[float] = field(default=None, metadata={"help": "ZeRO-3: keep the adapters' frozen "
                                                        "U, V, sigma0 whole on every rank, outside ZeRO-3, while they total at most "
                                                        "this many GiB (fewer tensors re-gathered each step); null: 2, or 0 when "
                                                        "the DeepSpeed config offloads parameters"})
    zero3_replicate_residual_gib: Optional[float] = field(default=None, metadata={"help": "ZeRO-3: keep the adapted "
                                                          "layers' frozen residual (4-bit codes or 16-bit weight) whole on every "
                                                          "rank, outside ZeRO-3, for the first layers that total at most this many "
                                                          "GiB; the rest stays partitioned (no per-layer gathers for those kept: "
                                                          "faster, more memory per GPU); null: a quarter of the GPU's memory, 0 on "
                                                          "CPU or when the DeepSpeed config offloads parameters"})
    eval_examples: int = field(default=300, metadata={"help": "held-out test examples scored before and after training (0: skip)"})
    eval_before: bool = field(default=True, metadata={"help": "also score the base model before training"})
    overwrite: bool = field(default=False, metadata={"help": "write into an output_dir that holds another run's results "
                            "(files of the same names are replaced; nothing else is deleted)"})
    timeout_minutes: float = field(default=30.0, metadata={"help": "collective timeout: a rank that stops answering "
                                   "ends a multi-rank job after this long (torch.distributed / DeepSpeed)"})
    eval_split: str = field(default="test", metadata={"help": "held-out split scored: test, or validation (for tuning; built-in data only)"})
    nan_policy: str = field(default="stop", metadata={"help": "a non-finite loss: stop (an error naming the step) or skip "
                            "(drop that step's update, at most train.nan_skip_limit times; not with DeepSpeed)"})
    nan_skip_limit: int = field(default=10, metadata={"help": "nan_policy=skip: stop once more steps than this were skipped"})
    resume_check: bool = field(default=True, metadata={"help": "--resume refuses a checkpoint written by a run "
                               "with other settings (data, lr, method, engine...); false resumes it anyway"})
    packing: str = field(default="auto", metadata={"help": "padding-free batches: the micro-batch's examples in one row with "
                         "position ids restarting per example (no pad tokens); auto: on where it is exact and cheaper (masks "
                         "from create_causal_mask and a flash/flex attention kernel), true, false"})
    num_epochs: Optional[float] = field(default=None, metadata={"help": "train for this many passes over the data "
                                        "instead of train.max_steps"})
    eval_steps: int = field(default=0, metadata={"help": "held-out loss every N steps through the Trainer (0: only "
                            "the accuracy before and after); needs eval_data or eval_fraction"})
    report_to: str = field(default="auto", metadata={"help": "tensorboard, wandb, none, or auto (tensorboard when installed)"})
    run_name: Optional[str] = field(default=None, metadata={"help": "the run's name in TensorBoard / W&B"})
    hf_args: dict = field(default_factory=dict, metadata={"help": "any other transformers.TrainingArguments, by their names "
                          "(e.g. {optim: adafactor, max_grad_norm: 0.5, save_total_limit: 2}); they override svd_scale's"})
    export: str = field(default="none", metadata={"help": "after training, also write the adapter as: peft (a PEFT "
                        "LoRA/DoRA folder, output_dir/peft), merged (a plain transformers checkpoint, output_dir/merged) or none"})

    def __post_init__(self) -> None:
        for name in ("packing", "compile"):  # `packing: false` in YAML
            if isinstance(getattr(self, name), bool):
                setattr(self, name, str(getattr(self, name)).lower())
        _typed(self, "train")
        for name in ("max_steps", "batch_size", "grad_accum", "max_length", "logging_steps"):
            _positive(f"train.{name}", getattr(self, name))
        for name in ("weight_decay", "warmup_ratio", "save_steps", "eval_examples", "seed"):
            _positive(f"train.{name}", getattr(self, name), allow_zero=True)
        if self.lr is not None:
            _positive("train.lr", self.lr)
        _positive("train.timeout_minutes", self.timeout_minutes)
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"train.warmup_ratio is a fraction of the steps, in [0, 1], got {self.warmup_ratio!r}")
        _choice("train.precision", self.precision, PRECISIONS)
        _choice("train.engine", self.engine, tuple(ENGINES))
        _choice("train.eval_split", self.eval_split, EVAL_SPLITS)
        _choice("train.export", self.export, EXPORTS)
        _choice("train.nan_policy", self.nan_policy, NAN_POLICIES)
        _choice("train.packing", self.packing, ("auto", "true", "false"))
        _choice("train.compile", self.compile, ("auto", "true", "false"))
        if self.num_epochs is not None:
            _positive("train.num_epochs", self.num_epochs)
        _positive("train.eval_steps", self.eval_steps, allow_zero=True)
        _check_hf_args(self.hf_args)
        _positive("train.nan_skip_limit", self.nan_skip_limit, allow_zero=True)
        for name in ("zero3_replicate_frozen_gib", "zero3_replicate_residual_gib"):
            if getattr(self, name) is not None:
                _positive(f"train.{name}", getattr(self, name), allow_zero=True)
        if self.nan_policy == "skip" and self.resolved_engine() == "deepspeed":
            raise ValueError("train.nan_policy=skip is not supported with DeepSpeed (its optimizer steps inside backward, "
                             "before the loss can be checked on every rank); use nan_policy=stop")
        if self.engine == "deepspeed" and not self.deepspeed:
            raise ValueError("train.engine=deepspeed needs train.deepspeed=<json config>, e.g. configs/deepspeed/zero3.json")
        if self.engine == "fsdp2" and self.deepspeed:
            raise ValueError("train.engine=fsdp2 and train.deepspeed are exclusive: drop one")
        if self.deepspeed and not Path(self.deepspeed).is_file():
            raise ValueError(f"train.deepspeed: no such file {self.deepspeed!r}")

    def compiles(self) -> bool:
        """``compile`` resolved: ``auto`` compiles where a CUDA GPU runs the layers; on CPU it stays eager
        (a choice, not a measurement: the compiled speed-ups were measured on GPUs, and CPU runs here are
        short jobs on small models where compile time is a large share)."""
        import torch

        return self.compile == "true" or (self.compile == "auto" and torch.cuda.is_available())

    def resolved_engine(self) -> str:
        if self.engine != "auto":
            return self.engine
        return "deepspeed" if self.deepspeed else "single"


@dataclass
class RunConfig:
    """One fine-tuning run: base model, data, adapter, training loop."""

    model: str = field(default="builtin:smollm2-135m-instruct", metadata={"help": "from_pretrained path, or builtin:smollm2-135m-instruct"})
    data: str = field(default="builtin:rotten_tomatoes", metadata={"help": "a file (.jsonl/.json/.csv/.parquet/.arrow), a folder "
                      "of them, a save_to_disk folder, a Hub dataset id, or builtin:rotten_tomatoes / builtin:plot_vs_review / builtin:debate_speaker; rows in "
                      "messages, ShareGPT, Alpaca, prompt/completion or text format (docs/data.md)"})
    data_split: str = field(default="train", metadata={"help": "split of a Hub dataset or saved DatasetDict to train on"})
    data_subset: Optional[str] = field(default=None, metadata={"help": "configuration (subset) name of a Hub dataset"})
    data_revision: Optional[str] = field(default=None, metadata={"help": "revision (branch, tag, commit) of a Hub dataset"})
    eval_data: Optional[str] = field(default=None, metadata={"help": "held-out data, any source `data` accepts (built-in data brings its own fixed split)"})
    eval_data_split: str = field(default="test", metadata={"help": "split of eval_data (Hub dataset or saved DatasetDict)"})
    eval_data_subset: Optional[str] = field(default=None, metadata={"help": "configuration (subset) of eval_data; unset: "
                                            "data_subset when eval_data is the same dataset as data, else none"})
    eval_data_revision: Optional[str] = field(default=None, metadata={"help": "revision of eval_data; unset: data_revision "
                                              "when eval_data is the same dataset as data, else none"})
    eval_fraction: float = field(default=0.0, metadata={"help": "hold out this fraction of `data` (fixed seed) when eval_data is "
                                 "not given; 0: every row trains"})
    chat_template: bool = field(default=False, metadata={"help": "prompt/completion rows as a user turn and the assistant's answer "
                                "through the tokenizer's chat template (chat formats always use it)"})
    data_streaming: bool = field(default=False, metadata={"help": "read `data` as a stream (datasets' streaming=True): rows are "
                                 "read, checked and tokenized as training consumes them, never all at once; the first 1000 "
                                 "are checked before the model loads; needs train.max_steps (not num_epochs), no eval_fraction"})
    data_num_proc: Optional[int] = field(default=None, metadata={"help": "worker processes that tokenize (datasets' map num_proc); "
                                         "null: the main process alone"})
    data_cache: bool = field(default=True, metadata={"help": "keep the tokenized data as an Arrow file under "
                             "$SVD_SCALE_CACHE/tokenized (default ~/.cache/svd_scale), named by the rows' content, the "
                             "tokenizer and max_length: rank 0 tokenizes, the other ranks (and nodes that share the file "
                             "system) and later runs read it"})
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _typed(self, "")
        if self.train.lr is None:  # the method's own rate (a user who sets none gets one that fits the method)
            from .methods import get_method

            # a copy: a TrainConfig shared by several RunConfigs keeps lr unset for the next method
            self.train = dataclasses.replace(self.train, lr=get_method(self.adapter.method).default_lr)
            if self.train.lr is None:
                raise ValueError(f"train.lr is not set and method {self.adapter.method!r} declares no default_lr; set train.lr")
        if self.data_streaming and self.train.num_epochs is not None:
            raise ValueError("data_streaming: a stream has no known length, so train.num_epochs cannot be counted; "
                             "set train.max_steps instead")
        if self.data_num_proc is not None and self.data_num_proc < 1:
            raise ValueError(f"data_num_proc is a number of processes >= 1 (or null), got {self.data_num_proc!r}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction is a fraction of the data, in [0, 1), got {self.eval_fraction!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["adapter"] = self.adapter.to_dict()
        return d


_SECTIONS = {"adapter": AdapterConfig, "train": TrainConfig}


def _coerce(value: str) -> Any:
    """Parse an override's value the way YAML would (numbers, bools, lists, null)."""
    parsed = yaml.safe_load(value) if value != "" else ""
    return value if isinstance(parsed, (datetime.date, datetime.datetime)) else parsed  # a folder named 2025-01-15


def _section_keys(cls) -> set:
    if cls is AdapterConfig:
        from .methods import option_users

        return ({f.name for f in fields(cls)} - {"options"}) | set(option_users())
    if cls is TrainConfig:
        return {f.name for f in fields(cls)} | set(TRAIN_ALIASES)
    return {f.name for f in fields(cls)}


def _build(cls, d: dict, where: str):
    d = dict(d or {})
    if cls is TrainConfig:
        for alias, name in TRAIN_ALIASES.items():
            if alias in d:
                if name in d:
                    raise ValueError(f"train.{alias} and train.{name} are the same setting: give one")
                d[name] = d.pop(alias)
    known = _section_keys(cls)
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {where} key(s) {unknown}; allowed: {sorted(known)}")
    return cls(**d)


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ValueError(f"override {item!r} is not key=value (e.g. adapter.rank=64)")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) == 1:
        name = parts[0]
        top = {f.name for f in fields(RunConfig)} - set(_SECTIONS)
        owners = [s for s, c in _SECTIONS.items() if name in _section_keys(c)]
        if name in top:
            parts = [name]
        elif len(owners) == 1:
            parts = [owners[0], name]
        elif not owners:
            raise ValueError(f"unknown config key {name!r}; `python launch/train.py --help-config` lists every key")
        else:
            raise ValueError(f"ambiguous key {name!r}: use one of {[o + '.' + name for o in owners]}")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {p!r} is not a section")
    if parts[0] == "train":  # an override replaces the setting under either spelling (lr / learning_rate)
        same = {parts[-1], TRAIN_ALIASES.get(parts[-1])} | {a for a, n in TRAIN_ALIASES.items() if n == parts[-1]}
        for other in same - {parts[-1], None}:
            node.pop(other, None)
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
    from .methods import option_help, option_users

    lines = []
    for section, cls in [("", RunConfig), *_SECTIONS.items()]:
        for f in fields(cls):
            if f.name in _SECTIONS or f.name == "options":
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{(section + '.') if section else ''}{f.name} = {json.dumps(default)}  # {f.metadata.get('help', '')}")
        if cls is AdapterConfig:
            users = option_users()
            lines += [f"adapter.{n} = null  # {h} [methods: {', '.join(users[n])}]" for n, h in option_help().items()]
    return "\n".join(lines)
