"""Exports other tools load: a PEFT folder that the real ``peft`` library reads back to the same outputs,
a merged checkpoint that plain transformers loads (tokenizer and chat template included), and PEFT
LoRA folders read as the ``lora`` method."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import svd_scale
from svd_scale import AdapterConfig
from svd_scale.methods import METHODS
from conftest import ROOT, save_tiny_llama_with_real_tokenizer, tiny_gpt2, tiny_llama
from test_methods import _perturb

ALL = sorted(METHODS)


def _trained(make, method, rank=6, **kw):
    model = svd_scale.apply(make(), AdapterConfig(method=method, rank=rank, svd="full", **kw))
    _perturb(model)
    return model.eval()


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_peft_export_loads_in_real_peft_with_the_same_outputs(method, make, tokens, tmp_path):
    from peft import PeftModel

    make().save_pretrained(tmp_path / "base")
    model = _trained(make, method)
    expected = _logits(model, tokens)
    svd_scale.save_adapter(model, str(tmp_path / "ad"))
    report = svd_scale.export_peft(str(tmp_path / "ad"), str(tmp_path / "peft"), base=str(tmp_path / "base"))
    assert report["exact"] and report["form"] == ("dora" if method == "svd_scale" else "lora")
    assert report["ranks"] == [12 if method in ("pissa", "sorsa", "kasa") else 6]
    got = _logits(PeftModel.from_pretrained(make(), str(tmp_path / "peft")).eval(), tokens)
    assert (expected - _logits(make(), tokens)).abs().max() > 1e-2  # the adapter changes the outputs
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # from the adapted model in memory, with no base given: the same tensors
    svd_scale.export_peft(model, str(tmp_path / "peft2"))
    from safetensors.torch import load_file
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("peft", "peft2"))
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5)


def _delta(model, name):
    """The float64 change of one layer's weight, independently: merged weight minus the base's."""
    layer = model.get_submodule(name)
    return (svd_scale.io.merged_weight(layer).double() - tiny_llama().get_submodule(name).weight.double()).detach()


def test_rank_k_lora_of_a_trained_scale_reports_its_error_and_it_falls_with_k(tmp_path):
    model = _trained(tiny_llama, "svd_scale", rank=8)
    name = "model.layers.0.mlp.up_proj"  # 96 x 64
    D = _delta(model, name)
    errors = []
    for k in (2, 8, 32, 64):
        rep = svd_scale.export_peft(model, str(tmp_path / f"k{k}"), form="lora", rank=k)
        per_layer = json.loads((tmp_path / f"k{k}" / "svd_scale_export.json").read_text())["per_layer_relative_error"]
        from safetensors.torch import load_file
        t = load_file(str(tmp_path / f"k{k}" / "adapter_model.safetensors"))
        BA = t[f"base_model.model.{name}.lora_B.weight"].double() @ t[f"base_model.model.{name}.lora_A.weight"].double()
        assert per_layer[name] == pytest.approx(float((D - BA).norm() / D.norm()), abs=1e-5)
        assert not rep["exact"] or k == 64
        errors.append(rep["max_relative_error"])
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.1 and errors[-1] < 1e-5  # full rank: exact


def test_shortening_an_exact_lora_keeps_the_best_components(tmp_path):
    model = _trained(tiny_llama, "pissa", rank=6)  # change of rank 12
    name = "model.layers.1.self_attn.o_proj"
    S = torch.linalg.svdvals(_delta(model, name))
    rep = svd_scale.export_peft(model, str(tmp_path / "p"), form="lora", rank=4)
    err = json.loads((tmp_path / "p" / "svd_scale_export.json").read_text())["per_layer_relative_error"][name]
    assert err == pytest.approx(float(S[4:].pow(2).sum().sqrt() / S.pow(2).sum().sqrt()), rel=1e-4)  # Eckart-Young
    assert rep["ranks"] == [4] and not rep["exact"]


def test_nf4_export_is_exact_against_the_full_precision_base(tokens, tmp_path):
    from peft import PeftModel

    tiny_llama().save_pretrained(tmp_path / "base")
    model = _trained(tiny_llama, "svd_scale", quant="nf4")
    svd_scale.save_adapter(model, str(tmp_path / "ad"))
    rep = svd_scale.export_peft(str(tmp_path / "ad"), str(tmp_path / "peft"), base=str(tmp_path / "base"))
    svd_scale.export_merged(str(tmp_path / "ad"), str(tmp_path / "base"), str(tmp_path / "merged"))
    from transformers import AutoModelForCausalLM
    peft_out = _logits(PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "peft")).eval(), tokens)
    merged_out = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval(), tokens)
    torch.testing.assert_close(peft_out, merged_out, atol=1e-5, rtol=0)  # both: adapter on the fp32 base
    gap = (peft_out - _logits(model, tokens)).abs().max()
    quant_at_init = (_logits(svd_scale.apply(tiny_llama(), AdapterConfig(quant="nf4", rank=6, svd="full")), tokens)
                     - _logits(tiny_llama(), tokens)).abs().max()
    assert 0 < gap < 3 * quant_at_init  # the 4-bit model differs by its quantization error, as stated
    assert "quantization error" in rep["note"]


def test_merged_export_loads_with_transformers_alone_tokenizer_and_template_included(tokens, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = save_tiny_llama_with_real_tokenizer(tmp_path / "base")
    before = sorted((p.name, p.stat().st_mtime) for p in Path(base).iterdir())
    model = svd_scale.apply(AutoModelForCausalLM.from_pretrained(base), AdapterConfig(method="sorsa", rank=6))
    _perturb(model)
    expected = _logits(model.eval(), tokens)
    svd_scale.save_adapter(model, str(tmp_path / "ad"), info={"data": "builtin:rotten_tomatoes", "steps": 7})
    svd_scale.export_merged(str(tmp_path / "ad"), base, str(tmp_path / "merged"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(loaded, tokens), expected, atol=1e-5, rtol=0)
    tok, ref_tok = AutoTokenizer.from_pretrained(tmp_path / "merged"), AutoTokenizer.from_pretrained(base)
    assert tok.chat_template and tok.chat_template == ref_tok.chat_template and len(tok) == len(ref_tok)
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "sorsa" in card and "builtin:rotten_tomatoes" in card and "| steps | 7 |" in card
    assert sorted((p.name, p.stat().st_mtime) for p in Path(base).iterdir()) == before  # base untouched
    with pytest.raises(FileExistsError, match="not empty"):
        svd_scale.export_merged(str(tmp_path / "ad"), base, str(tmp_path / "merged"))


@pytest.mark.parametrize("variant", ["plain", "patterns_rslora", "pissa_converted"])
def test_a_peft_lora_folder_loads_as_the_lora_method(variant, tokens, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    if variant == "patterns_rslora":
        kw.update(rank_pattern={"down_proj": 6}, alpha_pattern={"v_proj": 3}, use_rslora=True)
    if variant == "pissa_converted":
        kw.update(init_lora_weights="pissa")
    peft_model = get_peft_model(tiny_llama(), LoraConfig(**kw))
    if variant == "pissa_converted":
        peft_model.save_pretrained(tmp_path / "init")  # PEFT's conversion needs the initial adapter
    _perturb(peft_model)
    if variant == "pissa_converted":
        peft_model.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    else:
        peft_model.save_pretrained(tmp_path / "peft")
    reference = _logits(PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "peft")).eval(), tokens)
    model = svd_scale.load_adapter(tiny_llama(), str(tmp_path / "peft")).eval()
    assert model.svd_scale_config.method == "lora"
    torch.testing.assert_close(_logits(model, tokens), reference, atol=1e-5, rtol=0)


def test_peft_folders_svd_scale_cannot_continue_are_refused_naming_what_they_are(tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)).save_pretrained(tmp_path / "d")
    with pytest.raises(ValueError, match="PEFT DoRA adapter"):
        svd_scale.load_adapter(tiny_llama(), str(tmp_path / "d"))
    get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa")).save_pretrained(tmp_path / "p")
    with pytest.raises(ValueError, match="without conversion"):
        svd_scale.load_adapter(tiny_llama(), str(tmp_path / "p"))


def test_an_adapter_folder_from_before_the_rename_still_loads(tokens, tmp_path):
    model = _trained(tiny_llama, "svd_scale")
    svd_scale.save_adapter(model, str(tmp_path / "ad"))
    for new, old in (("svd_scale_adapter.json", "adapter_config.json"), ("svd_scale_adapter.safetensors", "adapter.safetensors")):
        (tmp_path / "ad" / new).rename(tmp_path / "ad" / old)
    loaded = svd_scale.load_adapter(tiny_llama(), str(tmp_path / "ad")).eval()
    torch.testing.assert_close(_logits(loaded, tokens), _logits(model, tokens), atol=0, rtol=0)


def test_export_command_writes_both_forms(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    svd_scale.save_adapter(_trained(tiny_llama, "svd_scale"), str(tmp_path / "ad"))
    said = {}
    for to in ("peft", "merged"):
        out = subprocess.run([sys.executable, str(ROOT / "launch" / "export.py"), str(tmp_path / "ad"), "--base",
                              str(tmp_path / "base"), "--to", to, str(tmp_path / to)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        said[to] = out.stdout
    assert "PEFT DoRA adapter (rank 6" in said["peft"] and ": exact" in said["peft"]
    assert "merged checkpoint written to" in said["merged"]
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["use_dora"] is True
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    bad = subprocess.run([sys.executable, str(ROOT / "launch" / "export.py"), str(tmp_path / "ad"), "--base",
                          str(tmp_path / "base"), "--to", "peft", str(tmp_path / "x"), "--form", "dora", "--rank", "2"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "rank applies to form='lora'" in bad.stderr


def test_train_export_writes_the_peft_and_merged_forms_after_training(tokens, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from svd_scale.config import load_config
    from svd_scale.training import run

    base = save_tiny_llama_with_real_tokenizer(tmp_path / "m")
    out = tmp_path / "out"
    args = (f"model={base}", "rank=4", "train.max_steps=2", "train.batch_size=2", "train.max_length=32",
            "train.eval_examples=0", "train.lr=5e-2", f"train.output_dir={out}")
    run(load_config(None, (*args, "train.export=peft")))
    trained = svd_scale.load_adapter(AutoModelForCausalLM.from_pretrained(base), str(out / "adapter")).eval()
    peft_out = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(out / "peft")).eval(), tokens)
    torch.testing.assert_close(peft_out, _logits(trained, tokens), atol=1e-5, rtol=0)
    run(load_config(None, (*args, "train.export=merged", "train.overwrite=true")))
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    trained = svd_scale.load_adapter(AutoModelForCausalLM.from_pretrained(base), str(out / "adapter")).eval()
    torch.testing.assert_close(_logits(merged, tokens), _logits(trained, tokens), atol=1e-5, rtol=0)
    assert "| steps | 2 |" in (out / "merged" / "README.md").read_text()
    with pytest.raises(FileExistsError, match="train.export=merged writes .*merged, which is not empty"):
        run(load_config(None, (*args, "train.export=merged", "train.overwrite=true")))


def test_real_smollm2_exports_to_peft_dora_and_merged_with_the_same_outputs(smollm2_path, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    ids = tok.apply_chat_template([{"role": "user", "content": "Is this review positive? A joy from start to end."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    load = lambda path=smollm2_path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    model = svd_scale.apply(load(), AdapterConfig(rank=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    _perturb(model)
    expected = _logits(model.eval(), ids)
    svd_scale.save_adapter(model, str(tmp_path / "ad"))
    assert svd_scale.export_peft(str(tmp_path / "ad"), str(tmp_path / "peft"), base=smollm2_path)["form"] == "dora"
    svd_scale.export_merged(str(tmp_path / "ad"), smollm2_path, str(tmp_path / "merged"))
    scale = expected.abs().max()
    assert (expected - _logits(load(), ids)).abs().max() > 1e-2 * scale
    for got in (_logits(PeftModel.from_pretrained(load(), str(tmp_path / "peft")).eval(), ids),
                _logits(load(tmp_path / "merged"), ids)):
        assert (got - expected).abs().max() <= 1e-5 * scale
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == tok.chat_template
