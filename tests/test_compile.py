"""train.compile: every decoder layer under torch.compile trains exactly like eager (CPU inductor)."""
import json

import torch
from conftest import save_tiny_llama_with_real_tokenizer

from svd_scale.config import load_config
from svd_scale.training import run


def test_compiled_blocks_train_like_eager_and_export_the_same_adapter(tmp_path):
    from safetensors.torch import load_file

    model = save_tiny_llama_with_real_tokenizer(tmp_path / "tiny")
    common = (f"model={model}", "rank=4", "adapter.quant=nf4", "adapter.quant_iters=1", "train.max_steps=4",
              "train.batch_size=2", "train.max_length=32", "train.logging_steps=1", "train.eval_examples=0",
              "train.gradient_checkpointing=true")
    keep = {}
    eager = run(load_config(None, (*common, f"train.output_dir={tmp_path / 'eager'}")))
    compiled = run(load_config(None, (*common, "train.compile=true", f"train.output_dir={tmp_path / 'compiled'}")), keep=keep)
    blocks = keep["model"].model.layers
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)  # really compiled
    a, b = (torch.tensor([l for _, l in m["losses"]]) for m in (eager, compiled))
    assert len(a) == 4 and (a[0] != a[-1])  # it trained
    torch.testing.assert_close(b, a, rtol=1e-4, atol=0)
    x, y = (load_file(str(tmp_path / d / "adapter" / "svd_scale_adapter.safetensors")) for d in ("eager", "compiled"))
    assert sorted(x) == sorted(y)
    for k in x:
        torch.testing.assert_close(y[k], x[k], rtol=1e-4, atol=1e-6)


def test_compile_auto_follows_the_device_and_zero3_refuses_it_without_checkpointing(monkeypatch, tmp_path):
    """``auto`` compiles on a CUDA GPU only; under DeepSpeed only ZeRO-3 with gradient checkpointing (leaf
    layers) and without ``memory_efficient_linear: true`` compiles: ``true`` otherwise is refused before
    anything loads, ``auto`` runs eager and says why."""
    import pytest

    from svd_scale.engines.zero3 import ZeRO3Engine

    assert load_config(None, ("train.compile=false",)).train.compiles() is False
    assert load_config(None, ("train.compile=true",)).train.compiles() is True
    for cuda in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        assert load_config(None, ()).train.compiles() is cuda
    with pytest.raises(ValueError, match="train.compile must be one of"):
        load_config(None, ("train.compile=sometimes",))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # auto resolves to "compile" below
    monkeypatch.setattr("deepspeed.init_distributed", lambda **k: None)
    zero3 = ("train.deepspeed=configs/deepspeed/zero3.json",)
    with pytest.raises(ValueError, match="needs train.gradient_checkpointing=true"):
        ZeRO3Engine(load_config(None, (*zero3, "train.compile=true"))).setup()
    eager = ZeRO3Engine(load_config(None, zero3))  # auto without checkpointing: eager, and it says why
    eager.setup()
    assert not eager.compile_wanted and "gradient_checkpointing" in eager.notes["compile"]
    assert "memory_efficient_linear" not in eager.ds["zero_optimization"]
    compiled = ZeRO3Engine(load_config(None, (*zero3, "train.gradient_checkpointing=true")))
    compiled.setup()
    assert compiled.compile_wanted and compiled.ds["zero_optimization"]["memory_efficient_linear"] is False
    assert not compiled.compiles()  # only once load() made the layers leaf modules (not for a custom adapt)
    compiled.notes["zero3_leaf_modules"] = "LlamaDecoderLayer"
    assert compiled.compiles()
    # a user's own JSON: ZeRO stage 2, or memory_efficient_linear: true, cannot compile this way
    for zero, why in (({"stage": 2}, "ZeRO stage 3"), ({"stage": 3, "memory_efficient_linear": True}, "memory_efficient_linear")):
        path = tmp_path / f"ds_{len(why)}.json"
        path.write_text(json.dumps({"zero_optimization": zero, "train_micro_batch_size_per_gpu": 1}))
        own = (f"train.deepspeed={path}", "train.gradient_checkpointing=true")
        with pytest.raises(ValueError, match=why):
            ZeRO3Engine(load_config(None, (*own, "train.compile=true"))).setup()
        quiet = ZeRO3Engine(load_config(None, own))
        quiet.setup()
        assert not quiet.compile_wanted and why in quiet.notes["compile"]


def test_every_method_trains_compiled_like_eager(tmp_path):
    """train.compile=auto compiles every method's layers on a GPU: each method's forward must trace
    (no graph break that fails) and train like eager. Two steps each (svd_scale itself is above)."""
    import svd_scale

    model = save_tiny_llama_with_real_tokenizer(tmp_path / "tiny")
    for method in sorted(set(svd_scale.METHODS) - {"svd_scale"}):
        common = (f"model={model}", f"method={method}", "rank=4", "train.max_steps=2", "train.batch_size=2",
                  "train.max_length=32", "train.logging_steps=1", "train.eval_examples=0",
                  "train.gradient_checkpointing=true")
        eager, compiled = (run(load_config(None, (*common, f"train.compile={c}", f"train.output_dir={tmp_path / method / c}")))
                           for c in ("false", "true"))
        assert compiled["compiled_blocks"] == 2 and "compiled_blocks" not in eager
        a, b = (torch.tensor([l for _, l in m["losses"]]) for m in (eager, compiled))
        assert len(a) == 2 and a[0] != a[1], method  # it trained
        torch.testing.assert_close(b, a, rtol=1e-4, atol=0, msg=lambda m: f"{method}: {m}")
