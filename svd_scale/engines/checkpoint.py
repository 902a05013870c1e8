"""Reading a base model's safetensors checkpoint tensor by tensor: what the sharded loaders share.

FSDP2 (``fsdp2.load_sharded``) and ZeRO-3 (``zero3.load_partitioned``) build the model's skeleton on the
meta device and fill it from the files themselves, so that no rank ever holds the whole model -- and a target
whose residual is stored in another form (NF4) never has its dense weight as a parameter at all: its owner rank
reads that one tensor, decomposes it and builds the stored form.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn


def checkpoint_files(path: str) -> list[Path]:
    """The safetensors files of a Hugging Face checkpoint folder (sharded with an index, or one file)."""
    p = Path(path)
    index = p / "model.safetensors.index.json"
    if index.is_file():
        return sorted({p / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = p / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"sharded loading reads safetensors: no model.safetensors(.index.json) in {path!r}")
    return [single]


def base_name(name: str) -> str:
    """A wrapped model's parameter name as the base checkpoint spells it."""
    return name.replace(".base_layer.", ".")


def tied_source(model: nn.Module, key: str) -> str:
    """The checkpoint key that holds ``key``'s values (a tied head reads the embedding)."""
    if key == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
        emb = model.get_input_embeddings()
        return next(n for n, m in model.named_modules() if m is emb) + ".weight"
    return key


class TensorReader:
    """Whole tensors by checkpoint key, read on demand (memory-mapped: only that tensor's bytes)."""

    def __init__(self, files: list):
        from safetensors import safe_open

        self.where = {}
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                self.where.update({k: f for k in fh.keys()})

    def __call__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.where[key]), framework="pt") as fh:
            return fh.get_tensor(key)

    def missing(self, keys) -> list[str]:
        return sorted(k for k in set(keys) if k not in self.where)

    def shape(self, key: str) -> tuple:
        """A tensor's shape from the file's header (no data read)."""
        from safetensors import safe_open

        with safe_open(str(self.where[key]), framework="pt") as fh:
            return tuple(fh.get_slice(key).get_shape())


def meta_skeleton(config, dtype: torch.dtype) -> nn.Module:
    """``config``'s causal LM with its parameters on the meta device (buffers, e.g. rotary tables, real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def expected_tensors(model: nn.Module) -> dict[str, tuple]:
    """Checkpoint key -> shape of every parameter a skeleton needs (before wrapping; a tied head is the
    embedding's key, read once). Persistent buffers are not read: they keep the values the model's constructor gives
    them (Llama, Qwen2 and GPT-2 in transformers 5 keep none in their checkpoints)."""
    return {tied_source(model, base_name(n)): tuple(p.shape) for n, p in model.named_parameters()}


def checkpoint_problem(read, expected: dict) -> Optional[str]:
    """What keeps ``read`` (a :class:`TensorReader`, or anything with ``missing``, ``shape`` and ``__call__``) from
    filling a model that needs ``expected`` (:func:`expected_tensors`), from the files' headers alone; None: nothing.
    transformers' ``from_pretrained`` also renames legacy keys (prefixes, conversions); these loaders do not."""
    missing = read.missing(expected)
    if missing:
        return (f"no tensors for {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                f"({len(missing)} of the {len(expected)} the model needs)")
    wrong = [(k, read.shape(k), s) for k, s in expected.items() if tuple(read.shape(k)) != s]
    if wrong:
        k, got, want = wrong[0]
        return f"tensor {k!r} has shape {got}, the model's is {want} ({len(wrong)} tensors differ)"
    return None
