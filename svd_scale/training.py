"""The training job behind ``launch/train.py``: build, evaluate, train, save.

Training uses transformers' ``Trainer`` -- the loop users already know, with its
DeepSpeed integration -- subclassed in these places:

* ``compute_loss`` adds the method's regularizer (``svd_scale.regularization_loss``);
* ``save_model`` writes the adapter (never the multi-GB base) -- collectively, so
  that under ZeRO-3 every rank joins the gather of full fp32 values;
* ``save_model`` also writes, in each checkpoint, the unpruned adapter and model-level training
  state, which ``_load_from_checkpoint`` restores on ``--resume``;

and, for a model FSDP2-sharded at load time (``train.engine: fsdp2``), in the two optimizer
hooks: transformers cannot checkpoint such a model's optimizer (it refuses unless
``save_only_model``), so ``svd_scale.fsdp`` writes and reads the sharded state with
``torch.distributed.checkpoint`` and the Trainer saves scheduler and RNG state as usual.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from . import builtin
from .config import RunConfig
from .data import Collator, load_splits, tokenized_dataset
from .evaluate import choice_accuracy
from .inject import adapter_layers, apply, parameter_counts
from .io import save_adapter, training_state_dict
from .losses import regularization_loss
from .methods.salora import set_progress

log = logging.getLogger("svd_scale")

RESUME_STATE = "training_state.safetensors"  # in each checkpoint-N folder, beside the exported adapter


def _trainer_class():
    from transformers import Trainer

    class SVDTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            reg = regularization_loss(self.accelerator.unwrap_model(model))
            if reg is None:
                return out
            # Trainer normalizes the task loss over the whole accumulated batch, so each
            # micro-batch carries 1/grad_accum of the regularizer.
            reg = reg / self.args.gradient_accumulation_steps
            return (out[0] + reg, out[1]) if return_outputs else out + reg

        def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
            output_dir = output_dir or self.args.output_dir
            model = self.accelerator.unwrap_model(self.model)
            save_any_adapter(model, os.path.join(output_dir, "adapter"))
            if _internal_call and any(True for _ in adapter_layers(model)):  # a checkpoint: what --resume reads
                from safetensors.torch import save_file

                state = training_state_dict(model)  # collective
                if self.args.should_save:
                    save_file(state, os.path.join(output_dir, RESUME_STATE))

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            """The adapter as training held it (unpruned) and model-level training state;
            ZeRO-3 checkpoints restore these through DeepSpeed instead."""
            from safetensors.torch import load_file

            from .fsdp import set_full_value

            path = os.path.join(resume_from_checkpoint, RESUME_STATE)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--resume: {resume_from_checkpoint!r} has no {RESUME_STATE}; "
                                        "it was not written by this version of svd_scale")
            state = load_file(path)
            params = dict(self.accelerator.unwrap_model(model or self.model).named_parameters())
            missing = sorted(set(state) - set(params))
            if missing:
                raise KeyError(f"--resume: {path} holds tensors this model lacks: {missing[:5]}")
            for name, full in state.items():
                set_full_value(params[name], full)  # FSDP2: this rank's rows

        # ----- FSDP2 (sharded at load time): the optimizer state through DCP -----
        def _sharded(self) -> bool:
            from .fsdp import is_fsdp2

            return is_fsdp2(self.accelerator.unwrap_model(self.model))

        def _save_optimizer_and_scheduler(self, output_dir):
            if not self._sharded():
                return super()._save_optimizer_and_scheduler(output_dir)
            from transformers.trainer import SCHEDULER_NAME

            from .fsdp import save_optimizer

            save_optimizer(self.accelerator.unwrap_model(self.model), self.optimizer, output_dir)
            if self.args.should_save:
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

        def _load_optimizer_and_scheduler(self, checkpoint):
            if checkpoint is None or not self._sharded():
                return super()._load_optimizer_and_scheduler(checkpoint)
            from transformers.trainer import SCHEDULER_NAME

            from .fsdp import load_optimizer

            load_optimizer(self.accelerator.unwrap_model(self.model), self.optimizer, checkpoint)
            self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))

    return SVDTrainer


def save_any_adapter(model: nn.Module, directory: str) -> None:
    """svd_scale adapters through save_adapter; a PEFT baseline through its own save_pretrained."""
    from .inject import adapter_layers

    if any(True for _ in adapter_layers(model)):
        save_adapter(model, directory)
    elif hasattr(model, "peft_config"):
        model.save_pretrained(directory)


def load_model_and_tokenizer(cfg: RunConfig):
    """The base model from a local path (``from_pretrained``), in the run's precision."""
    from transformers import AutoModelForCausalLM

    path = builtin.resolve_model_path(cfg.model)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, load_tokenizer(path)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def training_arguments(cfg: RunConfig, **extra):
    from transformers import TrainingArguments

    t = cfg.train
    return TrainingArguments(
        output_dir=t.output_dir,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.scheduler,
        warmup_steps=int(round(t.warmup_ratio * t.max_steps)),
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        seed=t.seed,
        data_seed=t.seed,
        # DeepSpeed: torch_autocast in its config; FSDP2: the MixedPrecisionPolicy set at sharding
        bf16=t.precision == "bf16" and not extra.get("deepspeed") and t.engine != "fsdp2",
        gradient_checkpointing=t.gradient_checkpointing,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not is_main(),
        **extra,
    )


def _deepspeed_config(cfg: RunConfig) -> dict:
    """The user's DeepSpeed JSON with the run's precision applied: bf16 runs in DeepSpeed's
    ``torch_autocast`` mode (parameters keep their dtypes: frozen base bf16, trainables
    fp32 in the module and the optimizer); fp32 runs turn autocast off."""
    from .distributed import read_ds_config

    ds = read_ds_config(cfg.train.deepspeed)
    for key in ("bf16", "fp16"):
        if ds.get(key, {}).get("enabled") in (True, "auto"):
            raise ValueError(f"{cfg.train.deepspeed}: '{key}.enabled' would cast the fp32 trainables to 16 bit; "
                             "svd_scale uses 'torch_autocast' instead (set train.precision=bf16)")
        ds.pop(key, None)
    ds["torch_autocast"] = {"enabled": cfg.train.precision == "bf16", "dtype": "bfloat16"}
    return ds


def _eval_callback(tok, test: list, metrics: dict, resume: bool, before: bool = True):
    """Held-out accuracy at the start (adapter at init == base model) and end of training.
    A callback, because under ZeRO-3 the model can run forward only once the engine exists."""
    from transformers import TrainerCallback

    from .distributed import settle

    class EvalCallback(TrainerCallback):
        trainer = None  # set once the Trainer exists: its engine settles ZeRO-3 after evaluation

        def on_train_begin(self, args, state, control, model=None, **kw):
            if test and before and not resume and "accuracy_before" not in metrics:
                metrics["accuracy_before"] = choice_accuracy(model, tok, test)
                settle(self.trainer.model_wrapped)
                note = "4-bit residual" if getattr(getattr(model, "svd_scale_config", None), "quant", "none") == "nf4" else "= base model"
                _say(f"held-out accuracy at init ({note}): {_pct(metrics['accuracy_before'])} on {len(test)} examples")

        def on_step_begin(self, args, state, control, model=None, **kw):
            set_progress(model, state.global_step / max(1, state.max_steps))  # SaLoRA's budget schedule

        def on_train_end(self, args, state, control, model=None, **kw):
            if test:
                metrics["accuracy_after"] = choice_accuracy(model, tok, test)
                settle(self.trainer.model_wrapped)
                _say(f"held-out accuracy after training:         {_pct(metrics['accuracy_after'])} on {len(test)} examples")

    return EvalCallback()


def run(cfg: RunConfig, resume: bool = False, adapt: Optional[Callable] = None, keep: Optional[dict] = None) -> dict:
    """Fine-tune ``cfg.model`` on ``cfg.data`` with an adapter; return (and write) metrics.

    ``adapt(model) -> model`` replaces ``svd_scale.apply`` (benchmarks use it to run
    the real PEFT library through the very same data, loop and evaluation); ``keep``,
    if given, receives the trained ``model`` and ``tokenizer`` (benchmarks score more splits)."""
    from .distributed import access_for, zero3_loading

    t0 = time.time()
    torch.manual_seed(cfg.train.seed)
    splits = load_splits(cfg.data, cfg.eval_data)
    engine = cfg.train.resolved_engine()
    ds = _deepspeed_config(cfg) if engine == "deepspeed" else None
    if ds is not None:
        import deepspeed

        deepspeed.init_distributed()  # deepspeed.comm must be up before zero.Init reads the world size
    fsdp2 = engine == "fsdp2"
    if fsdp2 and adapt is not None:
        raise ValueError("engine fsdp2 builds its own sharded model; a custom adapt() needs engine single or deepspeed")
    # fsdp2: transformers refuses to checkpoint a model sharded at load time unless told to save the
    # model only; SVDTrainer then saves the sharded optimizer itself (see below and svd_scale.fsdp).
    extra = {"save_only_model": True} if fsdp2 else {}
    checkpoint = _latest_checkpoint(cfg.train.output_dir) if resume else None  # before any expensive work
    if checkpoint and ds is not None:
        from .distributed import prepare_universal_resume

        written = prepare_universal_resume(checkpoint, torch.distributed.get_world_size())
        if written:
            _say(f"{checkpoint} was written by {written} ranks, this run has {torch.distributed.get_world_size()}: "
                 "resuming from its DeepSpeed universal copy")
            ds.setdefault("checkpoint", {})["load_universal"] = True
    args = training_arguments(cfg, deepspeed=ds, **extra)
    _ = args.device  # sets up torch.distributed under a launcher (lazy in TrainingArguments)
    zero3 = ds is not None and ds.get("zero_optimization", {}).get("stage") == 3
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    t_init = time.time()
    if fsdp2:  # built sharded and adapted in one pass (svd_scale.fsdp)
        from . import fsdp

        tok = load_tokenizer(builtin.resolve_model_path(cfg.model))
        model = fsdp.load_sharded(builtin.resolve_model_path(cfg.model), cfg.adapter, dtype,
                                  fsdp.mixed_precision(cfg.train.precision), seed=cfg.train.seed)
        # transformers' flag for a model sharded at load time: its Trainer then neither wraps it in
        # DDP nor shards it again, and FSDP2 reduces the gradients itself.
        model._is_distributed_loading_by_transformers = True
    else:
        with zero3_loading(args.hf_deepspeed_config.config, dtype) if zero3 else contextlib.nullcontext():
            model, tok = load_model_and_tokenizer(cfg)  # under ZeRO-3: built partitioned
    held_out = splits.validation if cfg.train.eval_split == "validation" else splits.test
    if cfg.train.eval_split == "validation" and not held_out and cfg.train.eval_examples:
        raise ValueError(f"train.eval_split=validation: data {cfg.data!r} has no validation split (built-in data only)")
    test = held_out[: cfg.train.eval_examples]
    metrics: dict = {"model": cfg.model, "data": cfg.data, "method": cfg.adapter.method if adapt is None else "custom",
                     "rank": cfg.adapter.rank, "steps": cfg.train.max_steps, "batch_size": cfg.train.batch_size,
                     "lr": cfg.train.lr, "engine": engine, "eval_split": cfg.train.eval_split,
                     "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1}
    if not fsdp2:
        t_init = time.time()
        model = adapt(model) if adapt else apply(model, cfg.adapter, seed=cfg.train.seed,
                                                       access=access_for(model, args.hf_deepspeed_config.config if ds else None))
    metrics["init_seconds"] = round(time.time() - t_init, 2)
    metrics["trainable_params"], metrics["total_params"] = parameter_counts(model)
    _say(f"adapter: {metrics['method']}{'' if adapt else f' r={cfg.adapter.rank}'}, trainable {metrics['trainable_params']:,} of "
         f"{metrics['total_params']:,} ({100 * metrics['trainable_params'] / metrics['total_params']:.3f}%), "
         f"init {metrics['init_seconds']} s")
    if cfg.train.gradient_checkpointing:
        model.enable_input_require_grads()
    if cfg.train.compile:
        compile_blocks(model)
    train_ds = tokenized_dataset(splits.train, tok, cfg.train.max_length)
    evaluation = _eval_callback(tok, test, metrics, resume, cfg.train.eval_before)
    trainer = _trainer_class()(model=model, args=args, train_dataset=train_ds, data_collator=Collator(tok.pad_token_id),
                               callbacks=[evaluation])
    evaluation.trainer = trainer
    if fsdp2:
        trainer.args.save_only_model = False  # full checkpoints: optimizer (DCP), scheduler, RNG
    t_train = time.time()
    if checkpoint:
        metrics["resumed_from"] = checkpoint
        _say(f"resuming from {checkpoint}")
    result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics["train_seconds"] = round(time.time() - t_train, 1)
    metrics["train_loss"] = result.training_loss
    metrics["losses"] = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    metrics["dtypes"] = _dtypes(model, trainer.optimizer)
    out = Path(cfg.train.output_dir)
    save_any_adapter(model, str(out / "adapter"))  # collective under ZeRO-3
    metrics["total_seconds"] = round(time.time() - t0, 1)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        _say(f"adapter saved to {out / 'adapter'}; metrics in {out / 'metrics.json'}")
    if keep is not None:
        keep.update(model=model, tokenizer=tok)
    return metrics


def compile_blocks(model: nn.Module) -> None:
    """``torch.compile`` each decoder layer (regional compilation, as torchtune and torchtitan do):
    one compiled graph serves every layer, so compile time does not grow with depth. On the GPU the
    adapter's small ops are launch-bound in eager mode; fused, svd_scale NF4 r=64 went from 1.44x to
    2.37x PEFT QLoRA's eager tokens/s (bench/results/train_throughput_H100.md)."""
    from .inject import decoder_layers

    for block in decoder_layers(model):
        block.compile()


def _dtypes(model: nn.Module, optimizer) -> dict:
    """dtypes of trainable and frozen parameters and of the optimizer's master copies:
    the fp32 contract made visible in every run's metrics."""
    masters, inner = [], optimizer
    while inner is not None:  # accelerate wrapper -> DeepSpeed ZeRO-3 optimizer -> torch optimizer
        if hasattr(inner, "fp32_partitioned_groups_flat"):  # ZeRO-3 keeps masters here between steps
            masters = list(inner.fp32_partitioned_groups_flat)
            break
        masters = [p for g in getattr(inner, "param_groups", []) for p in g["params"]]
        nxt = getattr(inner, "optimizer", None)
        inner = nxt if nxt is not inner else None
    return {
        "trainable": sorted({str(p.dtype) for p in model.parameters() if p.requires_grad}),
        "frozen": sorted({str(p.dtype) for p in model.parameters() if not p.requires_grad}),
        "optimizer": sorted({str(p.dtype) for p in masters}),
    }


def _latest_checkpoint(output_dir: str) -> Optional[str]:
    from transformers.trainer_utils import get_last_checkpoint

    if not Path(output_dir).is_dir():
        raise FileNotFoundError(f"--resume: no output folder {output_dir!r} to resume from")
    last = get_last_checkpoint(output_dir)
    if last is None:
        raise FileNotFoundError(f"--resume: no checkpoint-* folder in {output_dir!r} (set train.save_steps)")
    return last


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _say(msg: str) -> None:
    if is_main():
        print(f"[svd_scale] {msg}", flush=True)
