"""The training job behind ``launch/train.py``: build, evaluate, train, save.

``run`` picks the engine once (``svd_scale.engines``: single, deepspeed, fsdp2) and reads as a
short list of steps. Training uses transformers' ``Trainer`` -- the loop users already know, with
its DeepSpeed integration -- as :class:`SVDTrainer`, which differs in these places:

* ``compute_loss`` adds the method's regularizer (``svd_scale.regularization_loss``);
* ``save_model`` writes the adapter (never the multi-GB base) -- collectively, so that under
  ZeRO-3/FSDP2 every rank joins the gather of full fp32 values -- and, in each checkpoint, the
  unpruned adapter and model-level training state, which ``_load_from_checkpoint`` restores;
* the optimizer checkpoint hooks ask the engine first (FSDP2 writes its sharded state with
  ``torch.distributed.checkpoint``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from . import builtin, engines
from .access import is_main, set_full_value, world
from .config import RunConfig
from .data import Collator, load_splits, tokenized_dataset
from .engines.base import load_model, load_tokenizer, say
from .evaluate import choice_accuracy
from .formats import PromptStyle
from .inject import adapter_layers, parameter_counts
from .io import save_adapter, training_state_dict, with_saved_defaults
from .losses import regularization_loss
from .methods.salora import set_progress

log = logging.getLogger("svd_scale")

RESUME_STATE = "training_state.safetensors"  # in each checkpoint-N folder, beside the exported adapter
RUN_KEY = "svd_scale_run"  # RESUME_STATE's metadata: the fingerprint of the run that wrote it
SAVE_KEY = "svd_scale_save"  # ... and the id of the save it belongs to
MARKER = "svd_scale_checkpoint.json"  # written last into a checkpoint, with that save id: the save finished
# Keys a resumed run may change: where and how often it writes, how long it runs, what it reports.
RESUMABLE = ("train.max_steps", "train.output_dir", "train.save_steps", "train.logging_steps", "train.eval_examples",
             "train.eval_before", "train.eval_split", "train.overwrite", "train.timeout_minutes", "train.export",
             "train.resume_check", "train.compile", "train.deepspeed", "train.engine", "train.nan_policy",
             "train.nan_skip_limit", "train.gradient_checkpointing", "train.eval_steps", "train.report_to",
             "train.run_name", "train.hf_args", "train.num_epochs", "train.packing", "eval_data", "eval_data_split",
             "eval_fraction", "data_num_proc", "data_cache", "train.zero3_replicate_frozen_gib",
             "train.zero3_replicate_residual_gib")  # train.engine: the engine itself is compared (below)


class SVDTrainer(Trainer):
    """transformers' Trainer with the adapter's loss, saving and resuming (module docstring)."""

    def __init__(self, *args, engine: Optional[engines.Engine] = None, run: Optional[dict] = None,
                 nan_policy: str = "stop", nan_skip_limit: int = 0, **kwargs):
        self.svd_engine, self.svd_run = engine, run  # run: run_fingerprint(), stamped on every checkpoint
        self.nan_policy, self.nan_skip_limit, self.skipped_steps = nan_policy, nan_skip_limit, []
        super().__init__(*args, **kwargs)
        if nan_policy == "skip":
            self.add_callback(_DropFlaggedStep(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        reg = regularization_loss(self.accelerator.unwrap_model(model))
        if reg is None:
            return out
        # Trainer normalizes the task loss over the whole accumulated batch, so each
        # micro-batch carries 1/grad_accum of the regularizer.
        reg = reg / self.args.gradient_accumulation_steps
        return (out[0] + reg, out[1]) if return_outputs else out + reg

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The divergence guard: a non-finite loss on any rank stops every rank at this step, before
        anything is written from it (the checkpoints before it are kept). Under DeepSpeed the optimizer
        step of an accumulation boundary runs inside ``backward``, so the model in memory has taken
        that step already: do not keep training it after this error."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0], device=loss.device)
        if world()[1] > 1:
            torch.distributed.all_reduce(bad)
        if bad.item():
            step = self.state.global_step + 1
            if self.nan_policy == "skip" and (step in self.skipped_steps or len(self.skipped_steps) < self.nan_skip_limit):
                self._flag_skip(step)
                return loss
            limit = f" after skipping {len(self.skipped_steps)} step(s) (train.nan_skip_limit)" if self.skipped_steps else ""
            raise FloatingPointError(
                f"training diverged: non-finite loss at step {step} on {int(bad.item())} of {world()[1]} rank(s){limit}; "
                "nothing from this step was saved (lower train.lr; --resume continues from the last checkpoint)")
        return loss

    def _flag_skip(self, step: int) -> None:
        """``nan_policy=skip``: mark this optimizer step (once, whichever micro-batch of it was non-finite);
        :meth:`drop_flagged_step` drops its whole update at the accumulation boundary."""
        if step not in self.skipped_steps:
            self.skipped_steps.append(step)
            say(f"step {step}: non-finite loss; its update is skipped ({len(self.skipped_steps)} of at most "
                f"{self.nan_skip_limit})")

    def drop_flagged_step(self) -> None:
        """Before the optimizer step: every rank drops the gradients of a flagged step (all its micro-batches),
        so the optimizer leaves the adapter and its moments unchanged (AdamW skips parameters without a
        gradient)."""
        if self.skipped_steps and self.skipped_steps[-1] == self.state.global_step + 1:
            for p in self.model.parameters():
                if p.requires_grad:
                    p.grad = None

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        save_any_adapter(model, os.path.join(output_dir, "adapter"))
        if _internal_call and any(True for _ in adapter_layers(model)):  # a checkpoint: what --resume reads
            from safetensors.torch import save_file

            state = training_state_dict(model)  # collective
            if self.args.should_save:
                self.svd_save = (output_dir, uuid.uuid4().hex)
                meta = {SAVE_KEY: self.svd_save[1], **({RUN_KEY: json.dumps(self.svd_run, sort_keys=True)} if self.svd_run else {})}
                save_file(state, os.path.join(output_dir, RESUME_STATE), metadata=meta)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, then :data:`MARKER` naming the save id of its adapter state: a checkpoint
        whose marker is missing, or names another save (a rewrite into an old checkpoint cut short), is
        not complete (``checkpoint_problem``). ``save_total_limit``'s rotation runs only after the marker: the
        Trainer would delete the older checkpoints first, and a save cut short then would leave none to resume."""
        self.svd_save, limit = None, self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save and self.svd_save:
            folder, save_id = self.svd_save
            tmp = Path(folder) / f".{MARKER}.{save_id}.tmp"
            fields = self.svd_engine.marker_fields() if self.svd_engine else {}
            tmp.write_text(json.dumps({"save_id": save_id, "step": self.state.global_step, **fields}))
            os.replace(tmp, Path(folder) / MARKER)
        if self.args.should_save and limit:
            self._rotate(limit, self._get_output_dir(trial=trial))

    def _rotate(self, limit: int, run_dir: str) -> None:
        """The Trainer's own rotation (a function in transformers 5, a Trainer method before)."""
        try:
            from transformers.trainer_utils import rotate_checkpoints
        except ImportError:
            self.args.save_total_limit = limit
            return self._rotate_checkpoints(use_mtime=True, output_dir=run_dir)
        rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """The adapter as training held it (unpruned) and model-level training state;
        ZeRO-3 checkpoints restore these through DeepSpeed instead."""
        from safetensors.torch import load_file

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
            set_full_value(params[name], full)  # sharded: this rank's rows

    def _save_optimizer_and_scheduler(self, output_dir):
        if not (self.svd_engine and self.svd_engine.save_optimizer(self, output_dir)):
            super()._save_optimizer_and_scheduler(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None or not (self.svd_engine and self.svd_engine.load_optimizer(self, checkpoint)):
            super()._load_optimizer_and_scheduler(checkpoint)


class _DropFlaggedStep(TrainerCallback):
    """Calls :meth:`SVDTrainer.drop_flagged_step` between gradient clipping and the optimizer step."""

    def __init__(self, trainer: "SVDTrainer"):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.drop_flagged_step()


def save_any_adapter(model: nn.Module, directory: str, info: Optional[dict] = None) -> None:
    """svd_scale adapters through save_adapter; a PEFT baseline through its own save_pretrained."""
    if any(True for _ in adapter_layers(model)):
        save_adapter(model, directory, info)
    elif hasattr(model, "peft_config"):
        model.save_pretrained(directory)


def load_model_and_tokenizer(cfg: RunConfig):
    """The base model (``from_pretrained``, the run's precision) and its tokenizer."""
    return load_model(cfg), load_tokenizer(builtin.resolve_model_path(cfg.model))


def training_arguments(cfg: RunConfig, engine: engines.Engine):
    from transformers import TrainingArguments

    t = cfg.train
    steps = dict(num_train_epochs=t.num_epochs, max_steps=-1, warmup_steps=min(t.warmup_ratio, 0.999)) \
        if t.num_epochs else dict(max_steps=t.max_steps, warmup_steps=int(round(t.warmup_ratio * t.max_steps)))
    evals = dict(eval_strategy="steps", eval_steps=t.eval_steps, per_device_eval_batch_size=t.batch_size) if t.eval_steps else {}
    # a stream: every rank reads it and keeps its share of each global batch (accelerate's IterableDatasetShard);
    # accelerate's default for streams -- rank 0 reads and sends the batches -- needs batches of one shape,
    # which right padding to each batch's longest example (or packing) does not give
    stream = dict(accelerator_config={"dispatch_batches": False}) if cfg.data_streaming else {}
    kwargs = dict(
        output_dir=t.output_dir,
        **steps,
        **evals,
        **stream,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.scheduler,
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        seed=t.seed,
        data_seed=t.seed,
        bf16=t.precision == "bf16" and engine.trainer_bf16,
        gradient_checkpointing=t.gradient_checkpointing,
        use_cpu=not torch.cuda.is_available(),
        report_to=report_to(t.report_to),
        run_name=t.run_name,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not is_main(),
        ddp_timeout=max(1, int(round(60 * t.timeout_minutes))),
        **engine.trainer_arguments(),
    )
    return TrainingArguments(**{**kwargs, **t.hf_args})


def report_to(value: str) -> str:
    """``train.report_to``: ``auto`` is TensorBoard when it is installed (transformers writes its event
    files under ``output_dir/runs``), else nothing."""
    if value != "auto":
        return value
    import importlib.util

    return "tensorboard" if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX") else "none"


class EvalCallback(TrainerCallback):
    """Held-out accuracy at the start (adapter at init == base model) and end of training.
    A callback, because under ZeRO-3 the model can run forward only once the engine exists."""

    def __init__(self, tok, test: list, metrics: dict, resume: bool, before: bool, engine: engines.Engine, chat: bool = False):
        self.tok, self.test, self.metrics, self.engine = tok, test, metrics, engine
        self.style = PromptStyle(tok, chat)
        self.before = test and before and not resume
        self.trainer = None  # set once the Trainer exists: the engine settles ZeRO-3 after evaluation

    def _score(self, model, key: str, label: str) -> None:
        self.metrics[key] = choice_accuracy(model, self.tok, self.test, style=self.style)
        self.engine.settle(self.trainer)
        say(f"{label}{_pct(self.metrics[key])} on {len(self.test)} examples")

    def on_train_begin(self, args, state, control, model=None, **kw):
        if self.before and "accuracy_before" not in self.metrics:
            cfg = getattr(model, "svd_scale_config", None)  # None for a custom adapt() (PEFT baselines)
            note = "quantized residual" if cfg is not None and cfg.storage().quantized else "= base model"
            self._score(model, "accuracy_before", f"held-out accuracy at init ({note}): ")

    def on_step_begin(self, args, state, control, model=None, **kw):
        set_progress(model, state.global_step / max(1, state.max_steps))  # SaLoRA's budget schedule

    def on_train_end(self, args, state, control, model=None, **kw):
        if self.test:
            self._score(model, "accuracy_after", "held-out accuracy after training:         ")


class StepTimer(TrainerCallback):
    """Wall seconds of each optimizer step, so metrics.json tells how fast a run trained (each step ends
    in a GPU sync: ``SVDTrainer.training_step`` reads whether the loss is finite); the median leaves out
    the first two steps, which include ``torch.compile`` and the first allocations. On a GPU also rank 0's
    peak allocated memory since training began (the resident model included, init's transient peak not)."""

    def __init__(self, metrics: dict):
        self.metrics, self.times, self.t = metrics, [], None

    def on_train_begin(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_step_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if self.t is not None:
            self.times.append(time.perf_counter() - self.t)
            timed = self.times[2:] or self.times
            self.metrics["median_step_seconds"] = round(sorted(timed)[len(timed) // 2], 4)
        if torch.cuda.is_available():  # this rank's (rank 0 writes metrics.json) peak since training began
            self.metrics["train_peak_gib_rank0"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)


def _held_out(cfg: RunConfig, splits) -> list:
    held_out = splits.validation if cfg.train.eval_split == "validation" else splits.test
    if cfg.train.eval_split == "validation" and not held_out and cfg.train.eval_examples:
        raise ValueError(f"train.eval_split=validation: data {cfg.data!r} has no validation split (built-in data only)")
    return held_out[: cfg.train.eval_examples]


def _start_metrics(cfg: RunConfig, engine: engines.Engine, custom: bool) -> dict:
    return {"model": cfg.model, "data": cfg.data, "method": "custom" if custom else cfg.adapter.method,
            "rank": cfg.adapter.rank, "steps": cfg.train.max_steps, "batch_size": cfg.train.batch_size,
            "lr": cfg.train.lr, "engine": engine.name, "eval_split": cfg.train.eval_split, "world_size": world()[1]}


def _report_adapter(metrics: dict, model: nn.Module, cfg: RunConfig, custom: bool) -> None:
    metrics["trainable_params"], metrics["total_params"] = parameter_counts(model)
    say(f"adapter: {metrics['method']}{'' if custom else f' r={cfg.adapter.rank}'}, trainable "
        f"{metrics['trainable_params']:,} of {metrics['total_params']:,} "
        f"({100 * metrics['trainable_params'] / metrics['total_params']:.3f}%), init {metrics['init_seconds']} s")


def _finish(cfg: RunConfig, trainer, model: nn.Module, result, metrics: dict, t0: float) -> None:
    metrics["train_loss"] = result.training_loss
    metrics["losses"] = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    metrics["eval_losses"] = [(h["step"], h["eval_loss"]) for h in trainer.state.log_history if "eval_loss" in h]
    metrics["dtypes"] = _dtypes(model, trainer.optimizer)
    out = Path(cfg.train.output_dir)
    info = {"data": cfg.data, "steps": trainer.state.global_step, "learning_rate": cfg.train.lr, "engine": metrics["engine"],
            "world_size": metrics["world_size"], "train_loss": round(result.training_loss, 6)}
    save_any_adapter(model, str(out / "adapter"), info)  # collective when sharded
    metrics["total_seconds"] = round(time.time() - t0, 1)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        say(f"adapter saved to {out / 'adapter'}; metrics in {out / 'metrics.json'}")
        if cfg.train.export != "none" and metrics["method"] != "custom":
            _export(cfg, out)


def _export(cfg: RunConfig, out: Path) -> None:
    """``train.export``: the saved adapter as a PEFT folder or a merged checkpoint (from the base's files)."""
    from .export import export_merged, export_peft

    base = builtin.local_model_dir(cfg.model)
    if cfg.train.export == "peft":
        rep = export_peft(str(out / "adapter"), str(out / "peft"), base=base)
        say(f"PEFT {rep['form']} adapter written to {out / 'peft'} ({'exact' if rep['exact'] else 'approximate'})")
    else:
        export_merged(str(out / "adapter"), base, str(out / "merged"))
        say(f"merged checkpoint written to {out / 'merged'}")


def run(cfg: RunConfig, resume=False, adapt: Optional[Callable] = None, keep: Optional[dict] = None) -> dict:
    """Fine-tune ``cfg.model`` on ``cfg.data`` with an adapter; return (and write) metrics.

    ``resume``: True (the newest complete checkpoint in ``train.output_dir``) or a checkpoint folder.
    ``adapt(model) -> model`` replaces ``svd_scale.apply`` (benchmarks use it to run
    the real PEFT library through the very same data, loop and evaluation); ``keep``,
    if given, receives the trained ``model`` and ``tokenizer`` (benchmarks score more splits)."""
    t0 = time.time()
    torch.manual_seed(cfg.train.seed)
    check_launcher(cfg)
    check_output_dir(cfg, resume)  # before any expensive work, as the checkpoint search
    splits = load_splits(cfg.data, cfg.eval_data, split=cfg.data_split, eval_split=cfg.eval_data_split, subset=cfg.data_subset,
                         revision=cfg.data_revision, eval_fraction=cfg.eval_fraction,
                         streaming=cfg.data_streaming, eval_subset=cfg.eval_data_subset,
                         eval_revision=cfg.eval_data_revision)  # checked before any model loads
    if cfg.train.eval_steps and not splits.test:
        raise ValueError("train.eval_steps needs held-out data: set eval_data or eval_fraction")
    engine = engines.create(cfg)
    engine.setup()
    checkpoint = find_checkpoint(cfg.train.output_dir, resume) if resume else None
    if checkpoint:
        check_checkpoint_run(checkpoint, cfg, engine.name)
        engine.prepare_resume(checkpoint)
    args = training_arguments(cfg, engine)
    _ = args.device  # sets up torch.distributed under a launcher (lazy in TrainingArguments)
    check_same_config(cfg)
    tokenized = tokenize_splits(cfg, args, splits)
    with OutputLock(Path(cfg.train.output_dir)):
        return _train(cfg, engine, args, splits, tokenized, checkpoint, resume, adapt, keep, t0)


def tokenize_splits(cfg: RunConfig, args, splits) -> tuple:
    """(train, eval) datasets, tokenized once: rank 0 tokenizes into the cache (``data_cache``) while the others
    wait, then they read its file (``TrainingArguments.main_process_first``); a node that cannot see it (no
    shared file system) has its own first rank tokenize for it."""
    tok = load_tokenizer(builtin.resolve_model_path(cfg.model))
    cache = builtin.cache_dir() / "tokenized" if cfg.data_cache else None
    held = splits.validation if cfg.train.eval_split == "validation" else splits.test
    # with the cache, rank 0 tokenizes while the others wait (up to train.timeout_minutes), then each other node's
    # first rank -- which finds rank 0's file on a shared file system, or tokenizes for its node -- then the rest;
    # without the cache every rank tokenizes for itself, at the same time
    with contextlib.ExitStack() as first:
        if cache:
            first.enter_context(args.main_process_first(local=False, desc="tokenizing the data"))
            first.enter_context(args.main_process_first(local=True, desc="tokenizing the data"))
        train = tokenized_dataset(splits.train, tok, cfg.train.max_length, where=cfg.data, chat=cfg.chat_template,
                                  num_proc=cfg.data_num_proc, cache_dir=cache)
        held = tokenized_dataset(held, tok, cfg.train.max_length, where=cfg.eval_data or cfg.data, chat=cfg.chat_template,
                                 num_proc=cfg.data_num_proc, cache_dir=cache) if cfg.train.eval_steps else None
    return train, held


def _train(cfg: RunConfig, engine, args, splits, tokenized, checkpoint, resume, adapt, keep, t0: float) -> dict:
    """``run`` once the output folder is ours: load and adapt, train, save."""
    test = _held_out(cfg, splits)
    metrics = _start_metrics(cfg, engine, adapt is not None)
    t_init = time.time()
    model, tok = engine.load(args, adapt)
    metrics["init_seconds"] = round(time.time() - t_init, 2)
    metrics.update(engine.notes)
    _report_adapter(metrics, model, cfg, adapt is not None)
    if cfg.train.gradient_checkpointing:
        model.enable_input_require_grads()
    if engine.compiles():
        metrics["compiled_blocks"] = engine.compile_blocks(model)
        say(f"train.compile={cfg.train.compile}: {metrics['compiled_blocks']} decoder layers under torch.compile "
            "(the first steps compile them; train.compile=false runs eager)")
    evaluation = EvalCallback(tok, test, metrics, resume, cfg.train.eval_before, engine, cfg.chat_template)
    trainer = SVDTrainer(model=model, args=args, train_dataset=tokenized[0], eval_dataset=tokenized[1],
                         data_collator=collator(cfg, model, tok, metrics), callbacks=[evaluation, StepTimer(metrics)],
                         engine=engine,
                         run=run_fingerprint(cfg, engine.name), nan_policy=cfg.train.nan_policy,
                         nan_skip_limit=cfg.train.nan_skip_limit)
    evaluation.trainer = trainer
    engine.attach(trainer)
    if checkpoint:
        metrics["resumed_from"] = checkpoint
        say(f"resuming from {checkpoint}")
    t_train = time.time()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics["train_seconds"] = round(time.time() - t_train, 1)
    metrics["skipped_steps"] = trainer.skipped_steps
    _finish(cfg, trainer, model, result, metrics, t0)
    if keep is not None:
        keep.update(model=model, tokenizer=tok)
    return metrics


def packing_is_exact(model: nn.Module) -> bool:
    """Whether a padding-free batch keeps its examples apart: transformers builds a block-diagonal mask
    from restarting position ids (``masking_utils.find_packed_sequence_indices``) in models whose forward
    calls ``create_causal_mask``, when no attention mask and no cache are passed."""
    import inspect
    import sys

    for m in model.modules():  # the transformers model inside any wrapper (FSDP2's class, PEFT's)
        for cls in type(m).__mro__:
            if cls.__module__.startswith("transformers.models."):
                try:
                    return "create_causal_mask(" in inspect.getsource(sys.modules[cls.__module__])
                except (OSError, TypeError, KeyError):
                    return False
    return False


def collator(cfg: RunConfig, model: nn.Module, tok, metrics: dict):
    """``train.packing``: transformers' ``DataCollatorWithFlattening`` (one row per micro-batch, position ids
    restarting at each example, the first label of each example masked as it is never predicted) or
    right padding. Packing needs the model to run without a KV cache, so that the mask is built from the
    position ids."""
    from transformers import DataCollatorWithFlattening

    attn = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    varlen = attn.startswith(("flash_attention", "flex_attention"))  # cost per example; sdpa/eager: one (B*l)^2 mask
    on = cfg.train.packing == "true" or (cfg.train.packing == "auto" and varlen and packing_is_exact(model))
    metrics["packing"] = on
    if not on:
        return Collator(tok.pad_token_id)
    model.config.use_cache = False
    return DataCollatorWithFlattening(return_position_ids=True)


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


def config_differences(configs: list) -> dict:
    """Keys (dotted) whose values differ between ranks' configs -> each rank's value."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: json.dumps(v, sort_keys=True)})
        return out

    flats = [flat(c) for c in configs]
    keys = sorted(set().union(*flats))
    return {k: [f.get(k) for f in flats] for k in keys if len({f.get(k) for f in flats}) > 1}


def run_fingerprint(cfg: RunConfig, engine_name: str) -> dict:
    """What makes two runs' checkpoints interchangeable: the whole config except :data:`RESUMABLE`
    keys, plus the engine (a ZeRO-3 checkpoint's optimizer state is not a single-process one's) and the
    global batch in place of the per-rank one (a run may resume on another number of ranks)."""
    d = cfg.to_dict()
    d["adapter"].update(cfg.adapter.method_options())  # every option's value, defaults included
    for key in RESUMABLE + ("train.batch_size", "train.grad_accum"):
        section, _, name = key.partition(".")
        if name:
            d.get(section, {}).pop(name, None)
        else:
            d.pop(section, None)
    ranks = world()[1] if world()[1] > 1 else int(os.environ.get("WORLD_SIZE", "1"))  # before the group exists
    return {**d, "engine": engine_name, "global_batch": cfg.train.batch_size * cfg.train.grad_accum * ranks}


def check_checkpoint_run(checkpoint: str, cfg: RunConfig, engine_name: str) -> None:
    """Refuse to resume a checkpoint another run wrote (other data, lr, method, engine...), naming the
    differing keys; ``train.resume_check=false`` resumes it anyway."""
    stamp = _state_metadata(Path(checkpoint)).get(RUN_KEY)
    if stamp is None or not cfg.train.resume_check:
        if stamp is None:
            say(f"--resume: {checkpoint} carries no run fingerprint (written before svd_scale 0.2); not checked")
        return
    saved, now = json.loads(stamp), run_fingerprint(cfg, engine_name)
    saved["adapter"] = with_saved_defaults(saved.get("adapter", {}))  # options added since: as that run had them
    diff = {k: v for k, v in config_differences([saved, now]).items() if None not in v}  # keys both runs know
    if diff:
        shown = "; ".join(f"{k}: {a} there, {b} now" for k, (a, b) in list(diff.items())[:6])
        raise ValueError(f"--resume: {checkpoint} was written by a different run ({shown}). Resume with that run's "
                         "settings, start a new train.output_dir, or set train.resume_check=false to resume it anyway")


def check_same_config(cfg: RunConfig) -> None:
    """Every rank of a job must run the same configuration (a rank launched with another rank or lr
    would fail late or train silently wrong): gathered once, compared, refused on every rank."""
    if world()[1] == 1:
        return
    every = [None] * world()[1]
    torch.distributed.all_gather_object(every, cfg.to_dict())
    diff = config_differences(every)
    if diff:
        shown = "; ".join(f"{k}: " + ", ".join(f"rank {r} {v}" for r, v in enumerate(vals)) for k, vals in list(diff.items())[:5])
        raise ValueError(f"the ranks of this job were started with different configurations ({shown}); launch every "
                         "rank with the same config file and overrides")


def check_launcher(cfg: RunConfig) -> None:
    """``accelerate launch`` with its DeepSpeed or FSDP plugin would wrap the model its own way and skip
    svd_scale's sharded load and init: stop at once, saying which command runs the project's path."""
    import os

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true") and cfg.train.resolved_engine() != "deepspeed":
        raise RuntimeError("accelerate launch --use_deepspeed: svd_scale runs ZeRO-3 through its own engine, which this "
                           "launch would skip; use `deepspeed launch/train.py ... train.deepspeed=configs/deepspeed/zero3.json` "
                           "(your own DeepSpeed JSON works too)")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") and cfg.train.resolved_engine() != "fsdp2":
        raise RuntimeError("accelerate launch --use_fsdp: svd_scale shards with its own FSDP2 engine; add "
                           "train.engine=fsdp2 and launch without the FSDP plugin (`torchrun --nproc_per_node N "
                           "launch/train.py ... train.engine=fsdp2`)")


def check_output_dir(cfg: RunConfig, resume) -> None:
    """A run does not silently write over another run's results: an ``output_dir`` that holds
    checkpoints, an adapter or metrics needs ``--resume`` or ``train.overwrite=true`` (which replaces
    files of the same names and deletes nothing)."""
    out = Path(cfg.train.output_dir)
    used = sorted(p.name for p in out.iterdir() if p.name in ("metrics.json", "adapter")
                  or p.name.startswith("checkpoint-")) if out.is_dir() else []
    if used and not resume and not cfg.train.overwrite:
        raise FileExistsError(f"train.output_dir {str(out)!r} holds another run's results ({', '.join(used[:4])}"
                              f"{' ...' if len(used) > 4 else ''}): pass --resume to continue it, choose another "
                              "train.output_dir, or set train.overwrite=true to write over files of the same names")
    merged = out / "merged"
    if cfg.train.export == "merged" and merged.is_dir() and any(merged.iterdir()):
        raise FileExistsError(f"train.export=merged writes {merged}, which is not empty: move it away first "
                              "(a merged checkpoint is never written over)")


class OutputLock:
    """Keeps two runs out of one ``output_dir``: rank 0 holds ``.svd_scale.lock`` (host, pid) for the
    run's length. A lock left by a dead process on this host is taken over, and said so."""

    NAME = ".svd_scale.lock"

    def __init__(self, out: Path):
        self.path, self.mine = out / self.NAME, False

    def _stale(self) -> bool:
        try:
            info = json.loads(self.path.read_text())
            host, pid = info["host"], int(info["pid"])
        except (OSError, ValueError, KeyError):  # unreadable: being written, or its writer died mid-write
            return time.time() - self.path.stat().st_mtime > 60
        if host != socket.gethostname():
            return False
        if pid == os.getpid():  # a restarted container reuses pids: this process cannot hold it already
            return True
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            return True
        except PermissionError:
            return False

    def _take(self) -> Optional[str]:
        """Rank 0: create the lock; the reason it could not (None: taken)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self._stale():
            say(f"taking over {self.path}: the run that wrote it is gone")
            self.path.unlink(missing_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return (f"{self.path.parent} is in use by another run ({self.path.read_text().strip()}); wait for it, "
                    f"choose another train.output_dir, or delete {self.path} if that run is gone")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.ctime()}))
        self.mine = True
        return None

    def __enter__(self):
        problem = [self._take() if is_main() else None]
        if world()[1] > 1:  # every rank stops, not rank 0 alone
            torch.distributed.broadcast_object_list(problem, src=0)
        if problem[0]:
            raise RuntimeError(problem[0])
        return self

    def __exit__(self, *exc):
        if self.mine:
            self.path.unlink(missing_ok=True)
        return False


def checkpoint_problem(ckpt: Path) -> Optional[str]:
    """Why ``ckpt`` cannot be resumed (None: it is complete). The Trainer writes ``trainer_state.json``
    after the model, optimizer and RNG state, so a readable one marks a finished save; the adapter's
    training state must be there too."""
    state = ckpt / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json (its save was interrupted)"
    try:
        json.loads(state.read_text())
    except ValueError:
        return "trainer_state.json is unreadable (its save was interrupted)"
    if not (ckpt / RESUME_STATE).is_file():
        return f"no {RESUME_STATE} (not written by svd_scale, or its save was interrupted)"
    state_id = _state_metadata(ckpt).get(SAVE_KEY)
    try:
        marker = json.loads((ckpt / MARKER).read_text())["save_id"]
    except (OSError, ValueError, KeyError):
        if state_id is None:  # written before checkpoints had markers: trainer_state.json marks the end
            return None
        return f"no readable {MARKER} (its save was interrupted before the end)"
    if marker != state_id:
        return f"its files come from two different saves ({MARKER} {marker}, {RESUME_STATE} {state_id}): a rewrite was cut short"
    return None


def _state_metadata(ckpt: Path) -> dict:
    """The safetensors metadata of a checkpoint's adapter training state (run fingerprint, save id); {} if
    the file cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(str(ckpt / RESUME_STATE), framework="pt") as f:
            return f.metadata() or {}
    except (OSError, ValueError):
        return {}


def find_checkpoint(output_dir: str, resume) -> str:
    """The checkpoint ``--resume`` continues from: the given folder (``--resume PATH``), else the newest
    complete ``checkpoint-N`` in ``output_dir``; newer incomplete ones are skipped, and said so."""
    if isinstance(resume, str):
        problem = checkpoint_problem(Path(resume)) if Path(resume).is_dir() else "no such folder"
        if problem:
            raise FileNotFoundError(f"--resume {resume}: cannot resume from it: {problem}")
        return resume
    if not Path(output_dir).is_dir():
        raise FileNotFoundError(f"--resume: no output folder {output_dir!r} to resume from")
    found = sorted((p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for ckpt in found:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return str(ckpt)
        say(f"--resume: skipping {ckpt}: {problem}")
    raise FileNotFoundError(f"--resume: no complete checkpoint-* folder in {output_dir!r}"
                            + (" (all were incomplete, see above)" if found else " (set train.save_steps)"))


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
