"""Exports for the rest of the ecosystem: a PEFT adapter folder, or a merged transformers checkpoint.

``export_peft`` writes a folder that ``peft.PeftModel.from_pretrained(base, folder)`` loads with no
svd_scale installed. Every method writes its layer map over the *original* weight as
``scale * (W + B A)`` (``AdapterLayer.as_low_rank``), so the export is exact where that form exists:

* ``svd_scale`` (a trained scale ``s``): a DoRA adapter of rank r, ``B = U diag(sigma - sigma0)`` (``U diag(sigma0 * sigma_delta)`` with relative updates),
  ``A = V^T``, magnitude ``s * ||W + B A||`` per output row (DoRA, Liu et al. 2024, Sec. 4.1; PEFT
  recomputes the norm from the base it is given, which is why the base is needed here).
* ``svfit``, ``svd_scale`` with ``scale: none``, ``lora``, ``salora``: a LoRA of rank r; ``pissa``,
  ``sorsa``, ``kasa``: a LoRA of rank 2r (their change also removes r components of W -- the
  identity PEFT uses to turn PiSSA into LoRA).
* ``form="lora"`` where a scale is trained (``(s - 1) W`` is full rank), or ``rank=k`` below the
  exact rank: the best rank-k LoRA of the change (truncated SVD), with its relative error per layer
  in the report.

The base weights ``W`` come from the base model's safetensors files, one tensor at a time (a 70B base
is never held whole), or from a model in memory. With a 4-bit (NF4) residual the trained model used
``dequant(W_res)``; the export is exact against the full-precision base, so the PEFT model and the
4-bit trained model differ by the residual's quantization error (as any QLoRA adapter on a bf16 base).

``export_merged`` writes a plain transformers checkpoint shard by shard from the base's files: each
adapted weight is replaced by ``merge(residual(W))`` in the shard's dtype; config, tokenizer, chat
template and generation config are copied; a model card names base, method, rank and training data.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from . import peft_format
from . import svd as svdlib
from .io import _adapter_meta, adapter_state_dict, read_adapter
from .layer import AdapterLayer, math_dtype, to_out_in
from .methods import get_method
from .quant import storage_of

FORMS = ("auto", "dora", "lora")
REPORT_NAME = "svd_scale_export.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".gguf")


class BaseWeights:
    """The base model's original weight of each adapted layer (out x in, fp32 or float64), read one at a
    time: from a Hugging Face folder's safetensors files, or from a model in memory (a plain one, or the
    adapted model itself, whose ``W`` is rebuilt as stored residual + removed part)."""

    def __init__(self, base: Union[str, os.PathLike, nn.Module]):
        self.model = base if isinstance(base, nn.Module) else None
        self.files = None if self.model is not None else safetensors_map(Path(base))
        if self.model is not None and any(hasattr(p, "ds_id") or type(p).__name__ == "DTensor" for p in base.parameters()):
            raise ValueError("export from a ZeRO-3/FSDP2-sharded model in memory is not supported: save the adapter "
                             "(save_adapter) and export the folder with base=<the base model's folder>")

    def __call__(self, name: str, info: dict, t: dict) -> torch.Tensor:
        if self.model is not None:
            m = self.model.get_submodule(name)
            if isinstance(m, AdapterLayer):
                W = math_dtype(storage_of(m.base_layer).dense(m.base_layer))
                removed = type(m).removed({k: v.to(W.dtype) for k, v in t.items()}, m.opts)
                return W if removed is None else W + removed
            return math_dtype(to_out_in(m, m.weight.detach()))
        from safetensors import safe_open

        key = checkpoint_key(self.files, name)
        if key is None:
            raise KeyError(f"the base checkpoint has no tensor {name}.weight (adapted layer {name}); is it the base "
                           "this adapter was trained on?")
        with safe_open(str(self.files[key]), framework="pt") as f:
            W = f.get_tensor(key)
        return math_dtype(W.t() if info.get("conv1d") else W)


def checkpoint_key(files: dict, name: str) -> Optional[str]:
    """The checkpoint's key of module ``name``'s weight: ``<name>.weight``, or without the model's prefix
    (GPT-2's Hub checkpoint stores ``h.0.attn.c_attn.weight`` for ``transformer.h.0.attn.c_attn``)."""
    for key in (f"{name}.weight", f"{name.partition('.')[2]}.weight"):
        if key in files:
            return key
    return None


def safetensors_map(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from ``model.safetensors.index.json`` or the
    single ``model.safetensors`` of a Hugging Face model folder."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    raise FileNotFoundError(f"{folder}: no model.safetensors(.index.json); the base must be a Hugging Face folder "
                            "with safetensors weights (or pass the loaded model)")


def _source(adapter: Union[str, os.PathLike, nn.Module]):
    """(AdapterConfig, meta, tensors) of a saved adapter folder or of an adapted model (collective
    under ZeRO-3/FSDP2)."""
    if isinstance(adapter, nn.Module):
        state = adapter_state_dict(adapter)
        return adapter.svd_scale_config, _adapter_meta(adapter, state), state
    return read_adapter(str(adapter))


def _layer_tensors(cls, name: str, info: dict, cfg, state: dict) -> tuple[dict, dict]:
    opts = {**cfg.method_options(), "config_rank": cfg.rank}
    keys = cls.shapes(*info["shape"], int(info["rank"]), opts)
    return {k: state[f"{name}.{k}"].to(torch.float64) for k in keys}, opts


def layer_export(cls, W: torch.Tensor, t: dict, opts: dict, form: str, rank: Optional[int]) -> tuple[dict, float]:
    """One layer's PEFT tensors ({"A", "B"[, "magnitude"]}, float64) and the relative error of the
    change they carry (0 when exact). Pure; see the module docstring for the forms."""
    W = W.to(torch.float64)
    low = cls.as_low_rank(t, opts)
    scale = low[2] if low is not None else None
    if form == "auto":
        form = "dora" if low is not None and scale is not None else "lora"
    if form == "dora":
        if low is None:
            raise ValueError(f"method {cls.method!r} has no exact DoRA form; export with form='lora' and a rank")
        B, A = low[0], low[1]
        mag = torch.linalg.norm(W + B @ A, dim=1)
        return {"A": A, "B": B, "magnitude": mag if scale is None else scale * mag}, 0.0
    if low is not None and scale is None:
        if rank is None or rank >= low[0].shape[1]:
            return {"A": low[1], "B": low[0]}, 0.0
        B, A, err = svdlib.best_rank(svdlib.low_rank_svd(low[0], low[1]), rank)
        return {"A": A, "B": B}, err
    D = cls.merge(cls.residual(W, t, opts), t, opts) - W  # full rank: the best rank-k part, error measured
    k = min(rank or t[next(iter(t))].shape[0], *D.shape)
    f = svdlib.decompose(D, k, niter=8)
    B, A = f.U * f.S, f.Vh
    total = float(D.norm())
    return {"A": A, "B": B}, float((D - B @ A).norm()) / total if total > 0 else 0.0


def export_peft(adapter: Union[str, os.PathLike, nn.Module], out_dir: str, *,
                base: Union[str, os.PathLike, nn.Module, None] = None, form: str = "auto",
                rank: Optional[int] = None) -> dict:
    """Write ``adapter`` (a saved folder or an adapted model) as a PEFT LoRA/DoRA folder in ``out_dir``
    (module docstring). ``base``: the base model's folder or a loaded base model; optional when
    ``adapter`` is the adapted model itself. Returns (and writes as ``svd_scale_export.json``) a report:
    form, ranks, whether it is exact, the largest and mean relative error of the change."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {list(FORMS)}, got {form!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if form == "dora" and rank is not None:
        raise ValueError("rank applies to form='lora' (a DoRA export keeps the adapter's own rank)")
    if rank is not None:
        form = "lora"  # a rank asks for a LoRA of that rank
    if base is None and not isinstance(adapter, nn.Module):
        raise ValueError("export_peft of an adapter folder needs base= (the base model's folder or the loaded model)")
    cfg, meta, state = _source(adapter)
    weights, cls = BaseWeights(base if base is not None else adapter), get_method(cfg.method)
    layers, errors, forms = {}, {}, set()
    for name, info in meta["layers"].items():
        t, opts = _layer_tensors(cls, name, info, cfg, state)
        layers[name], errors[name] = layer_export(cls, weights(name, info, t), t, opts, form, rank)
        forms.add("dora" if "magnitude" in layers[name] else "lora")
    conv1d = any(i.get("conv1d") for i in meta["layers"].values())
    files = peft_format.write_lora(out_dir, layers, dora="dora" in forms, base_name=meta.get("base_model_name_or_path"),
                                   fan_in_fan_out=conv1d)
    report = {"form": sorted(forms)[0], "method": cfg.method, "exact": max(errors.values()) == 0.0,
              "ranks": sorted({int(v["A"].shape[0]) for v in layers.values()}),
              "max_relative_error": max(errors.values()), "mean_relative_error": sum(errors.values()) / len(errors),
              "layers": len(layers), "files": files, "quant": cfg.quant,
              "note": ("exact against the full-precision base; the trained model used a 4-bit residual, so the two "
                       "differ by its quantization error") if cfg.quant != "none" else None}
    (Path(out_dir) / REPORT_NAME).write_text(json.dumps({**report, "per_layer_relative_error": errors}, indent=2))
    return report


def _model_card(cfg, meta: dict, base: str) -> str:
    info = meta.get("training") or {}
    rows = [("base model", meta.get("base_model_name_or_path") or base), ("method", cfg.method), ("rank", cfg.rank),
            ("adapted layers", len(meta["layers"])), ("residual storage while training", cfg.quant)]
    rows += [(k.replace("_", " "), v) for k, v in info.items()]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (f"---\nlibrary_name: transformers\nbase_model: {meta.get('base_model_name_or_path') or base}\n"
            f"tags: [svd_scale, {cfg.method}]\n---\n\n# Merged {cfg.method} fine-tune\n\n"
            "A plain transformers checkpoint: the svd_scale adapter below was folded into the base weights "
            f"(no svd_scale needed to load it).\n\n| | |\n|---|---|\n{table}\n\n"
            f"Exported {datetime.date.today().isoformat()}.\n")


def _merge_shard(path: Path, todo: dict, keys: dict, cls, cfg, state: dict) -> dict:
    """One safetensors shard with each adapted weight replaced by the merged one (the shard's dtype)."""
    from safetensors.torch import load_file

    shard = load_file(str(path))
    for name, info in todo.items():
        t, opts = _layer_tensors(cls, name, info, cfg, state)
        W = shard[keys[name]]
        W0 = math_dtype(W.t() if info.get("conv1d") else W).to(torch.float64)
        M = cls.merge(cls.residual(W0, t, opts), t, opts)
        if not torch.isfinite(M).all():
            raise ValueError(f"merged weight of {name} has non-finite values; refusing to export")
        shard[keys[name]] = (M.t() if info.get("conv1d") else M).to(W.dtype).contiguous()
    return shard


def _write_merged(staging: Path, base: Path, files: dict, keys: dict, cfg, meta: dict, state: dict) -> None:
    from safetensors.torch import save_file

    cls = get_method(cfg.method)
    for path in sorted(set(files.values())):
        todo = {n: i for n, i in meta["layers"].items() if files[keys[n]] == path}
        save_file(_merge_shard(path, todo, keys, cls, cfg, state), str(staging / path.name), metadata={"format": "pt"})
    for f in base.iterdir():  # config, tokenizer, chat template, generation config, shard index
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in ("README.md", ".gitattributes"):
            shutil.copy2(f, staging / f.name)
    (staging / "README.md").write_text(_model_card(cfg, meta, str(base)))


def export_merged(adapter_dir: str, base_dir: str, out_dir: str) -> dict:
    """Write base + adapter as one plain transformers checkpoint in ``out_dir`` (module docstring),
    reading and writing one safetensors shard at a time. ``out_dir`` must not exist or be empty; the
    files are written to a temporary folder beside it that is renamed into place when complete."""
    cfg, meta, state = read_adapter(adapter_dir)
    base, out = Path(base_dir), Path(out_dir)
    files = safetensors_map(base)
    keys = {n: checkpoint_key(files, n) for n in meta["layers"]}
    missing = [n for n, k in keys.items() if k is None]
    if missing:
        raise KeyError(f"{base}: no weights for adapted layers {missing[:3]} ({len(missing)} in all); is it the base "
                       "this adapter was trained on?")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder (nothing is overwritten)")
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir(parents=True)
    try:
        _write_merged(staging, base, files, keys, cfg, meta, state)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # our own temporary folder: nothing half-written stays
        raise
    if out.exists():
        out.rmdir()  # empty, checked above
    os.replace(staging, out)
    return {"out_dir": str(out), "layers": len(meta["layers"]), "shards": len(set(files.values())),
            "copied": sorted(p.name for p in out.iterdir())}
