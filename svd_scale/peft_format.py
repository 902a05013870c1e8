"""PEFT's adapter folder format, read and written in one place.

A PEFT LoRA folder is ``adapter_config.json`` (a ``peft.LoraConfig``, with ``peft_type``) and
``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` (r x in),
``...lora_B.weight`` (out x r) and, for DoRA, ``...lora_magnitude_vector`` (out). Its layer map is
``W + (alpha/r) B A`` (``alpha/sqrt(r)`` with rsLoRA) and with DoRA
``m / ||W + (alpha/r) B A||_row * (W + (alpha/r) B A)`` (Liu et al. 2024, "DoRA", Sec. 4.1; the
norm per output row, as PEFT's ``DoraLinearLayer.get_weight_norm``).

Writing: ``svd_scale.export`` hands each layer's ``A``, ``B`` (scaling folded in, so alpha = r) and,
for DoRA, the magnitude; the config is written by PEFT's own ``LoraConfig.save_pretrained``, so a
folder loads with ``peft.PeftModel.from_pretrained`` and nothing of svd_scale installed.

Reading (``svd_scale.load_adapter`` on a PEFT folder): a plain LoRA (or a PiSSA adapter PEFT
converted to LoRA on saving) becomes the ``lora`` method exactly; anything svd_scale cannot continue
(DoRA, an unconverted PiSSA, other PEFT types, pickled ``.bin`` weights) is refused naming what it is.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from collections import Counter
from pathlib import Path
from typing import Optional

import torch

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
PARTS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "magnitude"}


def is_peft_folder(directory: str) -> bool:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        return "peft_type" in json.loads(path.read_text())
    except ValueError:
        return False


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name ending in it (a regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _refuse_unsupported(directory: str, conf: dict) -> None:
    kind = conf.get("peft_type")
    if kind != "LORA":
        raise ValueError(f"{directory!r} is a PEFT {kind} adapter; svd_scale reads PEFT LoRA folders only "
                         "(load this one with peft.PeftModel.from_pretrained)")
    if conf.get("use_dora"):
        raise ValueError(f"{directory!r} is a PEFT DoRA adapter; svd_scale cannot continue it as one of its methods "
                         "(load it with peft.PeftModel.from_pretrained, or merge it there)")
    init = str(conf.get("init_lora_weights")).lower()
    if init.startswith(("pissa", "olora", "corda", "eva", "loftq")):
        raise ValueError(f"{directory!r} is a PEFT {init} adapter saved without conversion: it applies to PEFT's "
                         "residual base model, not the original one. Save it with PEFT's "
                         "path_initial_model_for_weight_conversion= (a plain LoRA of rank 2r) and load that")
    if not (Path(directory) / WEIGHTS_FILE).is_file():
        raise ValueError(f"{directory!r}: PEFT adapter without {WEIGHTS_FILE} (a pickled adapter_model.bin can run "
                         "code when loaded; svd_scale reads safetensors only -- convert it with PEFT first)")


def read_lora(directory: str) -> tuple:
    """(AdapterConfig for ``lora``, layers meta, tensors ``<module>.A/.B``) from a PEFT LoRA folder. The
    per-layer scaling (alpha_pattern, rsLoRA) is folded into ``B`` so one ``alpha`` serves every layer."""
    from safetensors.torch import load_file

    from .config import AdapterConfig

    conf = json.loads((Path(directory) / CONFIG_FILE).read_text())
    _refuse_unsupported(directory, conf)
    raw = load_file(str(Path(directory) / WEIGHTS_FILE))
    parts: dict = {}
    for key, value in raw.items():
        part = next((p for p in PARTS if key.endswith("." + p)), None)
        if not key.startswith(PREFIX) or part is None:
            raise ValueError(f"{directory}: tensor {key!r} is not a LoRA factor of a linear layer "
                             "(embedding LoRA, modules_to_save and LoRA biases are not supported)")
        parts.setdefault(key[len(PREFIX):-len(part) - 1], {})[PARTS[part]] = value.float()
    r, alpha = int(conf["r"]), float(conf["lora_alpha"])
    state, layers = {}, {}
    for name, t in parts.items():
        if set(t) != {"A", "B"}:
            raise ValueError(f"{directory}: layer {name} has {sorted(t)}, expected lora_A and lora_B")
        r_l = t["A"].shape[0]
        a_l = float(_pattern_value(conf.get("alpha_pattern"), name, alpha))
        scaling = a_l / (r_l ** 0.5 if conf.get("use_rslora") else r_l)
        state[f"{name}.A"], state[f"{name}.B"] = t["A"], t["B"] * (scaling / (alpha / r_l))
        layers[name] = {"rank": r_l, "shape": [t["B"].shape[0], t["A"].shape[1]]}
    cfg = AdapterConfig(method="lora", rank=r, alpha=alpha, target_modules=sorted(layers))
    return cfg, layers, state


def write_lora(out_dir: str, layers: dict, *, dora: bool, base_name: Optional[str], fan_in_fan_out: bool) -> list[str]:
    """Write a PEFT folder: ``layers`` maps module name -> {"A", "B"[, "magnitude"]} with the scaling
    already in B (written with alpha = r). Only the two PEFT files are (re)placed, each atomically;
    returns their paths."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    ranks = {n: int(t["A"].shape[0]) for n, t in layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(n): k for n, k in ranks.items() if k != r}
    config = LoraConfig(r=r, lora_alpha=r, target_modules=sorted(layers), rank_pattern=pattern, alpha_pattern=pattern,
                        use_dora=dora, lora_dropout=0.0, bias="none", fan_in_fan_out=fan_in_fan_out,
                        task_type="CAUSAL_LM", base_model_name_or_path=base_name)
    tensors = {}
    for name, t in layers.items():
        for part, short in PARTS.items():
            if short in t:
                tensors[f"{PREFIX}{name}.{part}"] = t[short].detach().to(torch.float32).contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex
    staging = out / f".peft_export.{tag}.tmp"
    config.save_pretrained(str(staging))  # PEFT's own writer: a folder with adapter_config.json
    conf_path = staging / CONFIG_FILE
    save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
    os.replace(staging / WEIGHTS_FILE, out / WEIGHTS_FILE)
    os.replace(conf_path, out / CONFIG_FILE)
    for leftover in staging.iterdir():  # only what PEFT's writer put in our staging folder
        leftover.unlink()
    staging.rmdir()
    return [str(out / WEIGHTS_FILE), str(out / CONFIG_FILE)]
