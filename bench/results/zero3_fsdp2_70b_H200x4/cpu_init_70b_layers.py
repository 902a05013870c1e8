"""Run: DS_ACCELERATOR=cpu deepspeed --num_gpus 2 bench/results/zero3_fsdp2_70b_H200x4/cpu_init_70b_layers.py 2
Where the 70B load+adapt peak comes from: per-rank peak RSS after from_config under zero.Init, then after
svd_scale.apply (CPU, DS_ACCELERATOR=cpu, 70B layer shapes, 2 layers)."""
import resource, sys, time
ROOT = __import__("pathlib").Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "bench"))
import torch, deepspeed
import torch.distributed as dist
from zero3_throughput import SHAPES, ds_config
from transformers import AutoModelForCausalLM, LlamaConfig
import svd_scale
from svd_scale.engines.zero3 import ZeRO3Access, zero3_loading

def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (ru_maxrss is KiB on Linux)

deepspeed.init_distributed()
r = dist.get_rank()
L = int(sys.argv[-1])
cfg = LlamaConfig(**{**SHAPES["70b"], "num_hidden_layers": L}, max_position_embeddings=4096)
ds = ds_config("svd_scale_nf4", 8192, "leaf+persist+prefetch:0+reuse+live+mel")
print(f"rank {r} start peak RSS {rss():.2f} GiB", flush=True)
t = time.time()
with zero3_loading(ds, torch.bfloat16):
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
n = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # (the committed log predates this fix: 0.00 B)
local = sum(p.ds_tensor.numel() for p in model.parameters()) * 2 / 2**30
print(f"rank {r} after from_config: peak RSS {rss():.2f} GiB ({time.time()-t:.0f} s); model {n/1e9:.2f} B params "
      f"= {n*2/2**30:.2f} GiB bf16 whole, {local:.2f} GiB local", flush=True)
t = time.time()
svd_scale.apply(model, svd_scale.AdapterConfig(method="svd_scale", rank=64, svd="randomized", quant="nf4", quant_iters=1),
                access=ZeRO3Access(ds_config=ds, replicate_frozen_gib=2.0, replicate_residual_gib=0))
print(f"rank {r} after svd_scale.apply: peak RSS {rss():.2f} GiB ({time.time()-t:.0f} s)", flush=True)
