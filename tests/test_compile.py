"""train.compile: every decoder layer under torch.compile trains exactly like eager (CPU inductor)."""
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


def test_compile_is_refused_where_it_is_not_tested():
    import pytest

    with pytest.raises(ValueError, match="supported with engine single or fsdp2, not deepspeed"):
        load_config(None, ("train.compile=true", "train.deepspeed=configs/deepspeed/zero3.json"))
