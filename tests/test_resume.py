"""--resume in one process: stop after step 5, resume, and steps 6-10 and the adapter equal the
uninterrupted run -- including SaLoRA, whose budget multipliers are model-level state outside the
adapter file (the ZeRO-3 and FSDP2 versions of this check live in test_zero3.py / test_fsdp2.py)."""
import shutil

import pytest
from conftest import assert_resumed_like_uninterrupted, assert_same_adapter, save_tiny_llama_with_real_tokenizer

from svd_scale.config import load_config
from svd_scale.training import RESUME_STATE, run


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama_with_real_tokenizer(tmp_path_factory.mktemp("tiny_resume"))


@pytest.mark.parametrize("method,lr", [("svd_scale", 1e-2), ("salora", 1e-2)])
def test_resume_reproduces_the_uninterrupted_run(model_dir, tmp_path, method, lr):
    from safetensors.torch import load_file

    args = (f"model={model_dir}", f"method={method}", "rank=4", "train.max_steps=10", "train.save_steps=5",
            "train.batch_size=2", "train.max_length=32", "train.logging_steps=1", "train.eval_examples=0",
            f"train.lr={lr}")
    full = run(load_config(None, (*args, f"train.output_dir={tmp_path / 'full'}")))
    shutil.copytree(tmp_path / "full" / "checkpoint-5", tmp_path / "cut" / "checkpoint-5")
    state = load_file(str(tmp_path / "cut" / "checkpoint-5" / RESUME_STATE))
    if method == "salora":  # the multipliers moved by step 5, so restoring them matters
        assert state["salora_budget.lambdas"].abs().max() > 0
    resumed = run(load_config(None, (*args, f"train.output_dir={tmp_path / 'cut'}")), resume=True)
    assert_resumed_like_uninterrupted(full, resumed, rel=1e-6)
    assert_same_adapter(tmp_path / "full" / "adapter", tmp_path / "cut" / "adapter", atol=1e-6, rtol=1e-6)
