"""The interface every engine implements, and the loading helpers they share."""
from __future__ import annotations

from typing import Callable, ClassVar, Optional

import torch
from torch import nn

from .. import builtin
from ..access import is_main


def say(msg: str) -> None:
    """A progress line from rank 0 (the job's only chatter)."""
    if is_main():
        print(f"[svd_scale] {msg}", flush=True)


def model_dtype(cfg) -> torch.dtype:
    return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg) -> nn.Module:
    """The base model from a local path (``from_pretrained``), in the run's precision."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(builtin.resolve_model_path(cfg.model), dtype=model_dtype(cfg))


class Engine:
    """One way of running a training job (``train.engine``). ``training.run`` calls these in order:
    ``setup`` -> ``prepare_resume`` -> ``trainer_arguments`` -> ``load`` -> (Trainer built)
    ``attach`` -> training, with ``settle``/``save_optimizer``/``load_optimizer`` from the Trainer.
    The base class is the plain single-process behaviour; an engine overrides what differs."""

    name: ClassVar[str]
    #: whether transformers' own ``bf16=True`` is how this engine runs bf16 (else the engine does it)
    trainer_bf16: ClassVar[bool] = True

    def __init__(self, cfg):
        self.cfg = cfg
        self.notes: dict = {}  # what the engine chose by itself, reported in metrics.json

    def setup(self) -> None:
        """Before anything is built (process groups an engine needs early). On CPU under a launcher it
        starts the gloo group with ``train.timeout_minutes``: transformers passes ``ddp_timeout`` to the
        process group on GPUs but not with ``use_cpu`` (transformers 5.x ``TrainingArguments._setup_devices``),
        which would leave a stopped rank hanging its peers for the 30-minute default."""
        import os
        from datetime import timedelta

        import torch.distributed as dist

        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized() and not torch.cuda.is_available():
            dist.init_process_group(backend="gloo", timeout=timedelta(minutes=self.cfg.train.timeout_minutes))

    def prepare_resume(self, checkpoint: str) -> None:
        """Make ``checkpoint`` loadable by this run (called on every rank before any model loads)."""

    def trainer_arguments(self) -> dict:
        """Extra ``TrainingArguments`` for this engine."""
        return {}

    def load(self, args, adapt: Optional[Callable] = None) -> tuple[nn.Module, object]:
        """(adapted model, tokenizer). ``adapt(model)`` replaces ``svd_scale.apply`` (benchmarks)."""
        from ..inject import apply

        model = load_model(self.cfg)
        tok = load_tokenizer(builtin.resolve_model_path(self.cfg.model))
        model = adapt(model) if adapt else apply(model, self.cfg.adapter, seed=self.cfg.train.seed)
        return model, tok

    def compiles(self) -> bool:
        """Whether this run compiles its decoder layers (``train.compile``, ``auto`` resolved)."""
        return self.cfg.train.compiles()

    def compile_blocks(self, model: nn.Module) -> int:
        """Compile each decoder layer; returns how many. Here, and under FSDP2, ``Module.compile``: the
        layer's hooks (FSDP2's all-gather and reshard) are traced with it."""
        return compile_blocks(model)

    def marker_fields(self) -> dict:
        """What a checkpoint's marker records about how this engine laid out its state (read back by
        ``prepare_resume``)."""
        return {}

    def attach(self, trainer) -> None:
        """Adjust the Trainer once it exists."""

    def settle(self, trainer) -> None:
        """After forwards run outside a training step (evaluation)."""

    def save_optimizer(self, trainer, output_dir: str) -> bool:
        """Write the optimizer and scheduler state; False: the Trainer's own way."""
        return False

    def load_optimizer(self, trainer, checkpoint: str) -> bool:
        """Restore what :meth:`save_optimizer` wrote; False: the Trainer's own way."""
        return False


def compile_blocks(model: nn.Module, forward_only: bool = False) -> int:
    """``torch.compile`` each decoder layer (regional compilation, as torchtune and torchtitan do):
    one compiled graph serves every layer, so compile time does not grow with depth. On the GPU the
    adapter's small ops are launch-bound in eager mode and compiling fuses them
    (bench/results/train_throughput_H100.md). ``forward_only``: compile the layer's ``forward``, not
    ``Module.__call__``, so hooks around it stay eager (ZeRO-3's, ``zero3.compile_forwards``)."""
    from ..inject import decoder_layers

    blocks = decoder_layers(model)
    for block in blocks:
        if forward_only:
            block.forward = torch.compile(block.forward)
        else:
            block.compile()
    return len(blocks)
