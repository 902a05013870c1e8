"""The training job behind ``launch/train.py``: build, evaluate, train, save.

Training uses transformers' ``Trainer`` -- the loop users already know, with its
DeepSpeed integration -- subclassed in three places only:

* ``compute_loss`` adds the method's regularizer (``svd_scale.regularization_loss``);
* ``save_model`` writes the adapter (never the multi-GB base) -- collectively, so
  that under ZeRO-3 every rank joins the gather of full fp32 values;
* ``_load_from_checkpoint`` restores the adapter on ``--resume`` (single process).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import builtin
from .config import RunConfig
from .data import Collator, load_splits, tokenized_dataset
from .evaluate import choice_accuracy
from .inject import apply, parameter_counts
from .io import WEIGHTS_NAME, save_adapter
from .losses import regularization_loss

log = logging.getLogger("svd_scale")


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
            save_adapter(self.accelerator.unwrap_model(self.model), os.path.join(output_dir, "adapter"))

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            from safetensors.torch import load_file

            from .inject import adapter_layers

            state = load_file(os.path.join(resume_from_checkpoint, "adapter", WEIGHTS_NAME))
            with torch.no_grad():
                for name, layer in adapter_layers(self.accelerator.unwrap_model(model or self.model)):
                    for t, p in layer.tensors().items():
                        p.data.copy_(state[f"{name}.{t}"].to(p.dtype))

    return SVDTrainer


def load_model_and_tokenizer(cfg: RunConfig):
    """The base model from a local path (``from_pretrained``), in the run's precision."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = builtin.resolve_model_path(cfg.model)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, tok


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
        bf16=t.precision == "bf16",
        gradient_checkpointing=t.gradient_checkpointing,
        deepspeed=t.deepspeed if t.resolved_engine() == "deepspeed" else None,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not is_main(),
        **extra,
    )


def run(cfg: RunConfig, resume: bool = False) -> dict:
    """Fine-tune ``cfg.model`` on ``cfg.data`` with an adapter; return (and write) metrics."""
    t0 = time.time()
    torch.manual_seed(cfg.train.seed)
    splits = load_splits(cfg.data, cfg.eval_data)
    args = training_arguments(cfg)  # creates the DeepSpeed config object before the model is built (zero.Init)
    model, tok = load_model_and_tokenizer(cfg)
    test = splits.test[: cfg.train.eval_examples]
    metrics: dict = {"model": cfg.model, "data": cfg.data, "method": cfg.adapter.method, "rank": cfg.adapter.rank}
    if test and cfg.train.eval_before:
        metrics["accuracy_before"] = choice_accuracy(model, tok, test)
        _say(f"held-out accuracy before training: {_pct(metrics['accuracy_before'])} on {len(test)} examples")
    t_init = time.time()
    apply(model, cfg.adapter, seed=cfg.train.seed)
    metrics["init_seconds"] = round(time.time() - t_init, 2)
    metrics["trainable_params"], metrics["total_params"] = parameter_counts(model)
    _say(f"adapter: {cfg.adapter.method} r={cfg.adapter.rank}, trainable {metrics['trainable_params']:,} of "
         f"{metrics['total_params']:,} ({100 * metrics['trainable_params'] / metrics['total_params']:.3f}%), "
         f"init {metrics['init_seconds']} s")
    if cfg.train.gradient_checkpointing:
        model.enable_input_require_grads()
    train_ds = tokenized_dataset(splits.train, tok, cfg.train.max_length)
    trainer = _trainer_class()(model=model, args=args, train_dataset=train_ds, data_collator=Collator(tok.pad_token_id))
    t_train = time.time()
    result = trainer.train(resume_from_checkpoint=_latest_checkpoint(cfg.train.output_dir) if resume else None)
    metrics["train_seconds"] = round(time.time() - t_train, 1)
    metrics["train_loss"] = result.training_loss
    metrics["losses"] = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    out = Path(cfg.train.output_dir)
    save_adapter(model, str(out / "adapter"))
    if test:
        metrics["accuracy_after"] = choice_accuracy(model, tok, test)
        _say(f"held-out accuracy after training:  {_pct(metrics['accuracy_after'])} on {len(test)} examples")
    metrics["total_seconds"] = round(time.time() - t0, 1)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        _say(f"adapter saved to {out / 'adapter'}; metrics in {out / 'metrics.json'}")
    return metrics


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
