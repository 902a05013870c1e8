"""GPU check (not run by CI): ZeRO-3 (one rank under torchrun) with an NF4 residual, bf16 autocast,
gradient checkpointing, decoder-layer leaf modules and the engine's speed defaults, against the same
model without DeepSpeed: the losses of 8 AdamW steps.

    torchrun --nproc_per_node 1 bench/zero3_leaf_check.py MODEL_DIR   # a from_pretrained folder
"""
import json, os, sys
import torch
import deepspeed
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig
import svd_scale
from svd_scale.engines.zero3 import SPEED_DEFAULTS, set_leaf_modules

M = sys.argv[1]
DS = {"zero_optimization": {"stage": 3, **SPEED_DEFAULTS}, "train_micro_batch_size_per_gpu": 2,
      "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
      "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
cfg = svd_scale.AdapterConfig(rank=8, quant="nf4", quant_iters=1, svd="full")
g = torch.Generator().manual_seed(0)
data = [torch.randint(0, 49152, (2, 64), generator=g) for _ in range(8)]


def train(model, step_fn):
    losses = []
    for x in data:
        losses.append(step_fn(x.cuda()))
    return losses


deepspeed.init_distributed()
keep = HfDeepSpeedConfig(DS)
model = AutoModelForCausalLM.from_pretrained(M, dtype=torch.bfloat16)
svd_scale.apply(model, cfg)
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model.enable_input_require_grads()
model.train()
leaf = set_leaf_modules(model)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=DS)


def z3_step(x):
    loss = engine(input_ids=x, labels=x).loss
    engine.backward(loss)
    engine.step()
    return float(loss)


z3 = train(engine, z3_step)
del keep
ref = svd_scale.apply(AutoModelForCausalLM.from_pretrained(M, dtype=torch.bfloat16).cuda(), cfg)
ref.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
ref.enable_input_require_grads()
ref.train()
ropt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)


def ref_step(x):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = ref(input_ids=x, labels=x).loss
    loss.backward()
    ropt.step()
    ropt.zero_grad()
    return float(loss)


single = train(ref, ref_step)
print(json.dumps({"leaf": leaf, "zero3": [round(v, 5) for v in z3], "single": [round(v, 5) for v in single],
                  "max_rel": max(abs(a - b) / abs(b) for a, b in zip(z3, single))}))
