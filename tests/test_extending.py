"""docs/extending.md's three worked examples -- a method, a residual storage type, an engine -- run
as written (every Python block of the page, in order), and do what the page says."""
import re
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama_with_real_tokenizer, tiny_llama

import svd_scale
from svd_scale import config as config_mod
from svd_scale.engines import ENGINES
from svd_scale.methods import METHODS
from svd_scale.quant import STORAGES

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


@pytest.fixture(scope="module")
def ns():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 3
    ns: dict = {}
    for code in blocks:
        exec(compile(code, str(DOC), "exec"), ns)
    yield ns
    METHODS.pop("scaled_top_r", None)  # leave the registries as the other test files expect them
    STORAGES.pop("fp8_rows", None)
    ENGINES.pop("ddp", None)
    config_mod.ENGINES.remove("ddp")


def test_a_new_method_plugs_into_apply_config_save_load_and_merge(ns, tokens, tmp_path):
    from svd_scale.config import describe

    base = tiny_llama()
    with torch.no_grad():
        want = base(input_ids=tokens).logits
    cfg = svd_scale.AdapterConfig(method="scaled_top_r", rank=4, svd="full", init_delta=0.5)
    model = svd_scale.apply(tiny_llama(), cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=tokens).logits, want, atol=1e-5, rtol=1e-5)  # init = base
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".scale", ".delta")) for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids=tokens, labels=tokens).loss.backward()
    opt.step()
    with torch.no_grad():
        trained = model(input_ids=tokens).logits
    assert (trained - want).abs().max() > 1e-3
    svd_scale.save_adapter(model, str(tmp_path / "a"))
    loaded = svd_scale.load_adapter(tiny_llama(), str(tmp_path / "a"))
    merged = svd_scale.merge_and_unload(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, trained, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged(input_ids=tokens).logits, trained, atol=1e-4, rtol=1e-4)
    assert "adapter.init_delta = " in describe()
    with pytest.raises(ValueError, match=r"adapter.init_delta is not used by method 'lora'"):
        svd_scale.AdapterConfig(method="lora", init_delta=0.1)


def test_a_new_storage_type_holds_the_residual_and_merges_back(ns, tokens):
    base = tiny_llama()
    with torch.no_grad():
        want = base(input_ids=tokens).logits
    model = svd_scale.apply(tiny_llama(), svd_scale.AdapterConfig(rank=4, quant="fp8_rows"))
    layer = next(l for _, l in svd_scale.adapter_layers(model))
    assert type(layer.base_layer).__name__ == "FP8RowLinear" and layer.base_layer.weight.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        got = model(input_ids=tokens).logits
        assert 0 < (got - want).abs().max() < 0.1 * want.abs().max()  # 8-bit rounding of the residual only
        merged = svd_scale.merge_and_unload(model)
        assert all(type(m).__name__ != "FP8RowLinear" for m in merged.modules())
        torch.testing.assert_close(merged(input_ids=tokens).logits, got, atol=1e-4, rtol=1e-4)


def test_a_new_engine_is_accepted_by_the_config_and_runs_like_single(ns, tmp_path):
    from svd_scale.config import load_config
    from svd_scale.training import run

    model = save_tiny_llama_with_real_tokenizer(tmp_path / "m")
    common = (f"model={model}", "rank=4", "train.max_steps=2", "train.batch_size=4", "train.max_length=32",
              "train.eval_examples=0", "train.logging_steps=1")
    single = run(load_config(None, (*common, f"train.output_dir={tmp_path / 's'}")))
    ddp = run(load_config(None, (*common, "train.engine=ddp", f"train.output_dir={tmp_path / 'd'}")))
    assert ddp["engine"] == "ddp" and single["engine"] == "single"
    assert ddp["losses"] == single["losses"]
