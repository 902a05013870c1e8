"""Adapters on disk, and merging back into a plain Hugging Face model.

An adapter folder holds ``svd_scale_adapter.json`` (the AdapterConfig, the adapted module names with
their ranks and shapes, the base model's name and fingerprint) and ``svd_scale_adapter.safetensors``
(every TRAINABLE, FACTOR and INIT tensor, trainables in fp32). The names are the project's own, so no
tool mistakes the folder for a PEFT adapter (``svd_scale.export_peft`` writes one of those); folders
written before 0.2 (``adapter_config.json`` + ``adapter.safetensors``) are still read. Loading never
recomputes an SVD: the residual is rebuilt as ``W - removed(saved tensors)`` by the same code that
built it at init, so outputs match bit for bit.

Saving writes only these two files into the folder (never deleting anything else there): each is
written under a temporary name and renamed into place, the weights first. Both carry the same random
``save_id``, so a pair from two different saves (a save interrupted between the renames) is refused
when loading. Non-finite tensors are never written, never loaded, and never merged.

An adapter proves itself when loaded: every tensor the config's method and layer list expect is
present with its shape, and no tensor is left unused (an edited method or a dropped layer entry is
refused); the base model must match the fingerprint taken when saving (rows of the input embedding,
which no adapter changes). A PEFT LoRA folder loads as the ``lora`` method (``peft_format``).
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import peft_format
from .access import WeightAccess, full_value, is_main
from .config import AdapterConfig
from .inject import _set_module, adapter_layers, apply
from .layer import TrainingState, is_conv1d, is_linear_like, logical_shape, parameters_back
from .methods import get_method
from .quant import storage_of

CONFIG_NAME = "svd_scale_adapter.json"
WEIGHTS_NAME = "svd_scale_adapter.safetensors"
LEGACY_CONFIG_NAME, LEGACY_WEIGHTS_NAME = "adapter_config.json", "adapter.safetensors"  # before 0.2: read only
FORMAT_VERSION = 1
FINGERPRINT_RTOL = 5e-3  # a bf16 copy of the same base stays far inside; another model does not


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every declared adapter tensor at full size and in its own dtype (trainables fp32).
    Under ZeRO-3/FSDP2 every rank must call this: it gathers."""
    out = {}
    for name, layer in adapter_layers(model):
        t = type(layer).export({k: full_value(p).contiguous().clone() for k, p in layer.tensors().items()}, layer.opts)
        out.update({f"{name}.{k}": v.contiguous() for k, v in t.items()})
    return out


def training_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What ``--resume`` needs beyond the optimizer: every adapter tensor as training holds it
    (not pruned by an export) and the model-level ``TrainingState`` (SaLoRA's multipliers), by
    parameter name. Collective under ZeRO-3/FSDP2, like ``adapter_state_dict``."""
    out = {f"{name}.{k}": full_value(p).contiguous().clone()
           for name, layer in adapter_layers(model) for k, p in layer.tensors().items()}
    for mname, m in model.named_modules():
        if isinstance(m, TrainingState):
            out.update({f"{mname}.{k}": full_value(p).contiguous().clone() for k, p in m.named_parameters()})
    return out


def base_fingerprint(model: nn.Module) -> Optional[dict]:
    """Eight rows of the input embedding (which no adapter changes): their norms and sums, in float64.
    Collective under ZeRO-3/FSDP2 (gathers the embedding) the first time; a frozen embedding keeps the
    result, so later saves (every checkpoint) do not gather it again (70B: 1 GiB each time). None for a
    model without one."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None or not isinstance(getattr(emb, "weight", None), torch.Tensor):
        return None
    frozen = not emb.weight.requires_grad
    if frozen and getattr(emb, "_svd_scale_fingerprint", None) is not None:
        return emb._svd_scale_fingerprint
    W = full_value(emb.weight)
    rows = sorted({round(i * (W.shape[0] - 1) / 7) for i in range(8)})
    R = W[rows].double()
    fp = {"embedding_shape": list(W.shape), "rows": rows,
          "row_norms": R.norm(dim=1).tolist(), "row_sums": R.sum(dim=1).tolist()}
    if frozen:  # the same object on every rank, so every rank skips the next gather alike
        emb._svd_scale_fingerprint = fp
    return fp


def fingerprint_mismatch(saved: dict, found: Optional[dict]) -> Optional[str]:
    """What differs between two :func:`base_fingerprint` values (None: the same base, up to the
    rounding of a bf16/fp32 copy)."""
    if found is None:
        return "the base model has no input embedding to compare"
    if saved["embedding_shape"] != found["embedding_shape"]:
        return f"input embedding {saved['embedding_shape']} when saved, {found['embedding_shape']} now"
    for i, row in enumerate(saved["rows"]):
        n0, n1 = saved["row_norms"][i], found["row_norms"][i]
        s0, s1 = saved["row_sums"][i], found["row_sums"][i]
        if abs(n0 - n1) > FINGERPRINT_RTOL * abs(n0) or abs(s0 - s1) > FINGERPRINT_RTOL * max(abs(n0), 1e-12) * 4:
            return f"input embedding row {row}: norm {n0:.6g} / sum {s0:.6g} when saved, {n1:.6g} / {s1:.6g} now"
    return None


def _saved_rank(layer, name: str, state: dict) -> int:
    """The rank of a layer's tensors as saved: find an axis that grows with r in the
    method's declared shapes and read its size."""
    a = type(layer).shapes(layer.out_features, layer.in_features, 2, layer.opts)
    b = type(layer).shapes(layer.out_features, layer.in_features, 3, layer.opts)
    for t in a:
        axes = [i for i, (x, y) in enumerate(zip(a[t], b[t])) if x != y]
        if axes:
            return int(state[f"{name}.{t}"].shape[axes[0]])
    return layer.rank


def _adapter_meta(model: nn.Module, state: dict) -> dict:
    cfg: AdapterConfig = model.svd_scale_config
    layers = {}
    for n, l in adapter_layers(model):
        rank = _saved_rank(l, n, state)  # an export (SaLoRA) may have pruned components
        layers[n] = {"rank": int(rank), "shape": [l.out_features, l.in_features]}
        if is_conv1d(l.base_layer):
            layers[n]["conv1d"] = True  # stored in x out in the base checkpoint (GPT-2)
    base = getattr(getattr(model, "config", None), "_name_or_path", None)
    # every method option written with its value, so a later change of a default cannot change how it reads
    adapter = {**cfg.to_dict(), **cfg.method_options()}
    return {"format": FORMAT_VERSION, "adapter": adapter, "layers": layers, "base_model_name_or_path": base,
            "base_fingerprint": base_fingerprint(model)}


def non_finite(tensors: dict) -> list[str]:
    """Names of the floating-point tensors that hold NaN or inf."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def _refuse_non_finite(tensors: dict, what: str) -> None:
    bad = non_finite(tensors)
    if bad:
        raise ValueError(f"{what}: {len(bad)} of {len(tensors)} adapter tensors hold NaN or inf (first: {bad[:3]}); "
                         "the run diverged (lower train.lr) -- refusing to use them")


def _temp_name(name: str, save_id: str) -> str:
    return f".{name}.{save_id}.tmp"


def _remove_leftovers(target: Path) -> None:
    """Temporary files of interrupted saves into ``target`` (only names this module writes)."""
    for f in target.glob(".*.tmp"):
        if f.name.startswith((f".{WEIGHTS_NAME}.", f".{CONFIG_NAME}.")):
            f.unlink(missing_ok=True)


def save_adapter(model: nn.Module, directory: str, info: Optional[dict] = None) -> Optional[str]:
    """Write the adapter of ``model`` into ``directory`` (module docstring: two files, each renamed
    into place; anything else in the folder is left alone). ``info`` (e.g. the data and steps of the
    run) is kept in the config for model cards. Collective under ZeRO-3/FSDP2: call it on every rank;
    rank 0 writes. Returns the folder on the writer."""
    if not any(True for _ in adapter_layers(model)):
        raise ValueError("model has no svd_scale adapters to save")
    state = adapter_state_dict(model)
    _refuse_non_finite(state, f"save_adapter({directory!r})")  # every rank holds the same state: all raise
    meta = _adapter_meta(model, state)  # collective (fingerprint)
    if not is_main():
        return None
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(target)
    save_id = uuid.uuid4().hex
    meta.update(save_id=save_id, **({"training": info} if info else {}))
    weights, config = target / _temp_name(WEIGHTS_NAME, save_id), target / _temp_name(CONFIG_NAME, save_id)
    save_file(state, str(weights), metadata={"format": str(FORMAT_VERSION), "save_id": save_id})
    config.write_text(json.dumps(meta, indent=2))
    os.replace(weights, target / WEIGHTS_NAME)
    os.replace(config, target / CONFIG_NAME)
    return str(target)


def adapter_files(directory: str) -> tuple[Path, Path]:
    """The (config, weights) files of an svd_scale adapter folder, current or pre-0.2 names; a PEFT
    folder or anything else is refused naming what it is."""
    d = Path(directory)
    if (d / CONFIG_NAME).is_file():
        return d / CONFIG_NAME, d / WEIGHTS_NAME
    legacy = d / LEGACY_CONFIG_NAME
    if legacy.is_file():
        try:
            conf = json.loads(legacy.read_text())
        except ValueError as e:
            raise ValueError(f"{legacy}: not valid JSON ({e})") from None
        if "peft_type" in conf:
            raise ValueError(f"{directory!r} is a PEFT {conf['peft_type']} adapter, not an svd_scale one")
        return legacy, d / LEGACY_WEIGHTS_NAME
    raise FileNotFoundError(f"{directory!r} is not an svd_scale adapter folder (no {CONFIG_NAME})")


def read_adapter_config(directory: str) -> tuple[AdapterConfig, dict]:
    path, _ = adapter_files(directory)
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: adapter format {meta.get('format')!r} is not supported (expected {FORMAT_VERSION})")
    return AdapterConfig.from_dict(with_saved_defaults(meta["adapter"])), meta


def with_saved_defaults(adapter: dict) -> dict:
    """An adapter config as written (an adapter file's, a checkpoint's run stamp): an option it does not name
    (added after it was written) takes the value it was written with (``Option.saved_default``), not today's
    default."""
    try:
        declared = get_method(adapter.get("method", "svd_scale")).options
    except ValueError:
        return adapter  # AdapterConfig names the unknown method
    old = {k: o.saved_default for k, o in declared.items() if k not in adapter and o.saved_default is not None}
    return {**adapter, **old}


def read_adapter(directory: str) -> tuple[AdapterConfig, dict, dict]:
    """(config, meta, tensors) of a saved svd_scale adapter, after the save-pair and finiteness checks."""
    from safetensors import safe_open

    cfg, meta = read_adapter_config(directory)
    _, path = adapter_files(directory)
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: {path.name} is missing (the adapter's tensors)")
    with safe_open(str(path), framework="pt") as f:
        file_id = (f.metadata() or {}).get("save_id")
    if meta.get("save_id") != file_id:
        raise ValueError(f"{directory}: its config and {path.name} come from different saves "
                         f"({meta.get('save_id')} vs {file_id}); a save was interrupted -- save again")
    state = load_file(str(path))
    _refuse_non_finite(state, f"load_adapter({directory!r})")
    return cfg, meta, state


class SavedAdapter:
    """The value source of :func:`load_adapter` (see ``inject.apply``): the targets are the layers
    the file names, each with its saved rank; the values are the saved tensors. Every shape is
    checked against the base, and every tensor must be used, before anything changes."""

    def __init__(self, directory: str, cfg: AdapterConfig, layers_meta: dict, state: dict, meta: Optional[dict] = None):
        self.directory, self.cfg, self.layers_meta, self.state = directory, cfg, layers_meta, state
        self.meta = meta or {}  # base_model_name_or_path and base_fingerprint, checked when present

    def _check_base(self, model: nn.Module) -> None:
        saved = self.meta.get("base_fingerprint")
        problem = fingerprint_mismatch(saved, base_fingerprint(model)) if saved else None
        if problem:
            raise ValueError(f"{self.directory}: the adapter was trained on another base model "
                             f"({self.meta.get('base_model_name_or_path')!r}): {problem}. Load the base it was "
                             "trained on, or pass check_base=False if you are sure")

    def _check_tensors(self) -> None:
        cls = get_method(self.cfg.method)
        opts = {**self.cfg.method_options(), "config_rank": self.cfg.rank}
        expected = set()
        for name, info in self.layers_meta.items():
            for t, shape in cls.shapes(*info["shape"], int(info["rank"]), opts).items():
                key = f"{name}.{t}"
                expected.add(key)
                if key not in self.state or tuple(self.state[key].shape) != tuple(shape):
                    raise ValueError(f"{self.directory}: tensor {key} missing or of the wrong shape (expected "
                                     f"{tuple(shape)} for method {self.cfg.method!r})")
        unused = sorted(set(self.state) - expected)
        if unused:
            raise ValueError(f"{self.directory}: {len(unused)} tensors are not used by method {self.cfg.method!r} on "
                             f"the {len(self.layers_meta)} layers its config lists (first: {unused[:3]}); the config "
                             "was edited or the files do not belong together -- refusing a partial load")

    def plan(self, model: nn.Module) -> tuple[list, dict]:
        modules = dict(model.named_modules())
        problems = []
        for name, info in self.layers_meta.items():
            m = modules.get(name)
            if m is None or not is_linear_like(m):
                problems.append(f"{name}: not a linear layer in this base model")
            elif list(logical_shape(m)) != list(info["shape"]):
                problems.append(f"{name}: adapter expects {info['shape'][0]}x{info['shape'][1]}, base has "
                                f"{logical_shape(m)[0]}x{logical_shape(m)[1]}")
        if not problems:
            self._check_tensors()
            self._check_base(model)
        if problems:
            raise ValueError(f"adapter at {self.directory!r} does not fit {type(model).__name__}:\n  "
                             + "\n  ".join(problems[:10])
                             + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""))
        return [(n, modules[n]) for n in self.layers_meta], {n: int(i["rank"]) for n, i in self.layers_meta.items()}

    def __call__(self, i: int, name: str, layer, W: torch.Tensor) -> dict:
        return {t: self.state[f"{name}.{t}"] for t in layer.tensors()}


def load_adapter(model: nn.Module, directory: str, *, access: Optional[WeightAccess] = None,
                 check_base: bool = True) -> nn.Module:
    """Put a saved adapter onto a fresh base model (in place), through the same pipeline as
    ``apply`` with the saved tensors as the source: no SVD, exact outputs. A PEFT LoRA folder is
    read as the ``lora`` method. ``check_base=False`` skips the base-model fingerprint check (module
    docstring) -- only for a base you know is the one the adapter was trained on."""
    if not (Path(directory) / CONFIG_NAME).is_file() and peft_format.is_peft_folder(directory):  # ours first
        cfg, layers_meta, state = peft_format.read_lora(directory)
        return apply(model, cfg, source=SavedAdapter(directory, cfg, layers_meta, state), access=access)
    cfg, meta, state = read_adapter(directory)
    if not check_base:
        meta = {k: v for k, v in meta.items() if k != "base_fingerprint"}
    return apply(model, cfg, source=SavedAdapter(directory, cfg, meta["layers"], state, meta), access=access)


def merged_weight(layer) -> torch.Tensor:
    """The dense out x in weight (fp32) equal to an adapter layer's map (pure given its state)."""
    W_res = storage_of(layer.base_layer).dense(layer.base_layer)
    W = type(layer).merge(W_res, layer.fp32_tensors(W_res.dtype), layer.opts)
    if not torch.isfinite(W).all():
        raise ValueError(f"merged weight of a {layer.method} layer has non-finite values; refusing to merge")
    return W


def _set_module_none(model: nn.Module, name: str) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    delattr(parent, child)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer's weight and remove the adapters, giving
    the plain model class back (``nn.Linear``/``Conv1D`` layers, loadable by plain
    transformers after ``save_pretrained``). Idempotent: a model without adapters is
    returned unchanged."""
    layers = list(adapter_layers(model))
    for name, layer in layers:  # before anything changes
        _refuse_non_finite({f"{name}.{k}": v.detach() for k, v in layer.tensors().items()}, "merge_and_unload")
    for name, layer in layers:
        base = layer.base_layer
        with torch.no_grad():  # a quantized residual merges into a plain layer in the compute dtype
            base = storage_of(base).plain(base, merged_weight(layer), layer.compute_dtype)
        parameters_back(base)  # weights an engine kept as buffers (ZeRO-3) are parameters again: state_dict holds them
        _set_module(model, name, base)
    if hasattr(model, "svd_scale_config"):
        del model.svd_scale_config
    for name, m in list(model.named_modules()):
        if isinstance(m, TrainingState):
            _set_module_none(model, name)
    return model
