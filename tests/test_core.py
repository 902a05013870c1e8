"""Parity and invariants of the svd_scale adapter on real module types (single process)."""
import pytest
import torch
from torch import nn

import svd_scale
from svd_scale import AdapterConfig, Role
from svd_scale.layer import AdapterLayer
from svd_scale.methods import get_method
from conftest import tiny_gpt2, tiny_llama


def _perturb(model, seed=5):
    """Stand-in for training: move every trainable away from its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g) * (p.abs().mean() + 1e-3))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
@pytest.mark.parametrize("algorithm", ["full", "randomized"])
def test_output_equals_base_at_init(make, algorithm, tokens):
    base = make()
    ref = base(tokens).logits
    model = svd_scale.apply(make(), AdapterConfig(rank=8, svd=algorithm))
    assert sum(1 for _ in svd_scale.adapter_layers(model)) > 0
    torch.testing.assert_close(model(tokens).logits, ref, atol=2e-5, rtol=0)


def test_output_equals_base_in_float64(tokens):
    """With float64 weights the split W = W_res + U diag(s) V^T is exact to ~1e-12."""
    ref = tiny_llama().double()(tokens).logits
    model = svd_scale.apply(tiny_llama().double(), AdapterConfig(rank=8, svd="full"))
    torch.testing.assert_close(model(tokens).logits, ref, atol=1e-10, rtol=0)


def test_real_smollm2_logits_unchanged_at_init(smollm2_path):
    from transformers import AutoModelForCausalLM

    x = torch.tensor([[1, 504, 3301, 314, 253, 1345, 28, 2724, 30]])
    base = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = base(x).logits
        model = svd_scale.apply(base, AdapterConfig(rank=32))
        out = model(x).logits
    assert sum(1 for _ in svd_scale.adapter_layers(model)) == 30 * 7  # all seven projections, no lm_head
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=1e-4)
    assert (out.argmax(-1) == ref.argmax(-1)).all()


def test_default_targets_skip_head_and_embeddings(llama):
    svd_scale.apply(llama, AdapterConfig(rank=4))
    names = {n.split(".")[-1] for n, _ in svd_scale.adapter_layers(llama)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert isinstance(llama.lm_head, nn.Linear) and not isinstance(llama.lm_head, AdapterLayer)


@pytest.mark.parametrize("update,trained", [("relative", "sigma_delta"), ("absolute", "sigma")])
def test_only_sigma_and_scale_get_gradients(llama, tokens, update, trained):
    svd_scale.apply(llama, AdapterConfig(rank=4, target_modules=["q_proj", "down_proj"], sigma_update=update))
    llama.train()
    llama(tokens, labels=tokens).loss.backward()
    got = {n for n, p in llama.named_parameters() if p.grad is not None}
    expected = {f"{n}.{t}" for n, l in svd_scale.adapter_layers(llama) for t in (trained, "scale")}
    assert got == expected
    assert all(llama.get_parameter(n).grad.abs().sum() > 0 for n in expected)
    assert {n for n, p in llama.named_parameters() if p.requires_grad} == expected


def test_trainables_fp32_in_a_bf16_model(tokens):
    model = svd_scale.apply(tiny_llama().to(torch.bfloat16), AdapterConfig(rank=4))
    for _, layer in svd_scale.adapter_layers(model):
        assert layer.sigma_delta.dtype == torch.float32 and layer.scale.dtype == torch.float32
        assert layer.U.dtype == torch.bfloat16 and layer.base_layer.weight.dtype == torch.bfloat16
        assert layer.sigma0.dtype == torch.float32 and not layer.sigma_delta.any()
    model.train()
    out = model(tokens, labels=tokens)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    _, layer = next(svd_scale.adapter_layers(model))
    assert layer.sigma_delta.grad.dtype == torch.float32


def test_parameter_counts(llama):
    total_before = sum(p.numel() for p in llama.parameters())
    svd_scale.apply(llama, AdapterConfig(rank=4))
    trainable, total = svd_scale.parameter_counts(llama)
    layers = list(svd_scale.adapter_layers(llama))
    assert trainable == sum(l.rank + l.out_features for _, l in layers)
    extra = sum(l.rank * (l.out_features + l.in_features) + 2 * l.rank + l.out_features for _, l in layers)
    assert total == total_before + extra


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_save_load_round_trip_is_exact(make, tokens, tmp_path):
    model = svd_scale.apply(make(), AdapterConfig(rank=6))
    _perturb(model)
    expected = model(tokens).logits
    svd_scale.save_adapter(model, str(tmp_path / "ad"))
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["svd_scale_adapter.json", "svd_scale_adapter.safetensors"]
    from safetensors.torch import load_file
    state = load_file(str(tmp_path / "ad" / "svd_scale_adapter.safetensors"))
    assert all(v.dtype == torch.float32 for k, v in state.items() if k.endswith((".sigma", ".sigma_delta", ".scale")))
    # a fresh base, and an SVD that must not run: loading reuses the saved factors
    fresh = make()
    import svd_scale.svd as S
    orig = S.decompose
    S.decompose = lambda *a, **k: (_ for _ in ()).throw(AssertionError("load_adapter must not run an SVD"))
    try:
        loaded = svd_scale.load_adapter(fresh, str(tmp_path / "ad"))
    finally:
        S.decompose = orig
    assert torch.equal(loaded(tokens).logits, expected)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == \
           {n for n, p in model.named_parameters() if p.requires_grad}


def test_load_onto_a_mismatched_base_fails_clearly(tmp_path, tokens):
    from transformers import LlamaConfig, LlamaForCausalLM
    model = svd_scale.apply(tiny_llama(), AdapterConfig(rank=4))
    svd_scale.save_adapter(model, str(tmp_path / "ad"))
    other = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=128))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: adapter expects 64x64, base has 32x32"):
        svd_scale.load_adapter(other, str(tmp_path / "ad"))
    assert not any(True for _ in svd_scale.adapter_layers(other))  # nothing changed


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_merge_matches_and_is_idempotent(make, tokens, tmp_path):
    model = svd_scale.apply(make(), AdapterConfig(rank=6))
    _perturb(model)
    expected = model(tokens).logits
    merged = svd_scale.merge_and_unload(model)
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    assert not hasattr(merged, "svd_scale_config")
    torch.testing.assert_close(merged(tokens).logits, expected, atol=2e-5, rtol=0)
    before = {k: v.clone() for k, v in merged.state_dict().items()}
    again = svd_scale.merge_and_unload(merged)
    assert again is merged and all(torch.equal(before[k], v) for k, v in again.state_dict().items())
    # plain transformers loads what save_pretrained writes
    merged.save_pretrained(tmp_path / "hf")
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(plain(tokens).logits, expected, atol=2e-5, rtol=0)


def test_merge_with_bias_matches(tokens):
    """Bias stays outside the scale: s * (W_res x + d) + b. GPT-2 layers have biases."""
    model = svd_scale.apply(tiny_gpt2(), AdapterConfig(rank=6))
    _perturb(model, seed=9)
    _, layer = next(svd_scale.adapter_layers(model))
    assert layer.base_layer.bias is not None
    x = torch.randn(3, layer.in_features)
    # float64 reference of the layer's formula
    t = {k: v.double() for k, v in layer.fp32_tensors().items()}
    W_res = layer.base_layer.weight.double().T
    sigma = t["sigma0"] * (1 + t["sigma_delta"])  # sigma_update: relative (the default)
    ref = t["scale"] * (x.double() @ W_res.T + x.double() @ ((t["U"] * sigma) @ t["Vh"]).T) + layer.base_layer.bias.double()
    torch.testing.assert_close(layer(x).double(), ref, atol=1e-5, rtol=0)


def test_bad_targets_and_ranks_fail_before_any_work(llama, monkeypatch):
    import svd_scale.svd as S
    monkeypatch.setattr(S, "decompose", lambda *a, **k: pytest.fail("an SVD ran before validation"))
    with pytest.raises(ValueError, match=r"\['qkv'\] match no linear layer.*candidate names: \['down_proj', 'gate_proj'"):
        svd_scale.apply(llama, AdapterConfig(rank=4, target_modules=["q_proj", "qkv"]))
    with pytest.raises(ValueError, match=r"rank=33 does not fit layer 'model.layers.0.self_attn.k_proj' \(32x64\)"):
        svd_scale.apply(llama, AdapterConfig(rank=33))
    with pytest.raises(ValueError, match="regex"):
        svd_scale.apply(llama, AdapterConfig(rank=4, target_modules=r".*nothing.*"))
    assert not any(isinstance(m, AdapterLayer) for m in llama.modules())
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="adapter.rank must be a positive integer"):
            AdapterConfig(rank=bad)


def test_apply_twice_is_refused(llama):
    svd_scale.apply(llama, AdapterConfig(rank=4))
    with pytest.raises(ValueError, match="already has svd_scale adapters"):
        svd_scale.apply(llama, AdapterConfig(rank=4))


def test_roles_drive_trainability():
    """Trainability comes from the declared roles alone, for every method."""
    from svd_scale.layer import TrainingState
    from svd_scale.methods import METHODS
    for name, cls in METHODS.items():
        assert set(cls.roles.values()) <= set(Role), name
        model = svd_scale.apply(tiny_llama(), AdapterConfig(method=name, rank=4))
        declared = {id(p) for _, l in svd_scale.adapter_layers(model)
                    for t, p in l.tensors((Role.TRAINABLE,)).items()}
        declared |= {id(p) for m in model.modules() if isinstance(m, TrainingState) for p in m.parameters()}
        assert {id(p) for p in model.parameters() if p.requires_grad} == declared, name


def test_import_does_not_pull_deepspeed_or_bitsandbytes():
    import subprocess, sys
    code = "import sys, svd_scale; print('deepspeed' in sys.modules, 'bitsandbytes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_real_bert_encoder_parity_and_merge():
    """A real encoder (all-MiniLM-L6-v2, BERT: query/key/value/dense layers with biases)."""
    from transformers import AutoModel
    from svd_scale.builtin import resolve_model_path
    path = resolve_model_path("builtin:minilm")
    x = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    base = AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        ref = base(input_ids=x).last_hidden_state
        model = svd_scale.apply(AutoModel.from_pretrained(path).eval(), AdapterConfig(rank=16, target_modules=["query", "key", "value", "dense"]))
        assert {n.split(".")[-1] for n, _ in svd_scale.adapter_layers(model)} == {"query", "key", "value", "dense"}
        torch.testing.assert_close(model(input_ids=x).last_hidden_state, ref, atol=1e-4, rtol=0)
        _perturb(model)
        expected = model(input_ids=x).last_hidden_state
        merged = svd_scale.merge_and_unload(model)
        torch.testing.assert_close(merged(input_ids=x).last_hidden_state, expected, atol=1e-4, rtol=0)


def test_relative_updates_move_every_singular_value_by_the_same_fraction(llama, tokens):
    """sigma_update=relative (docs/methods.md, "Learning rate"): Adam's first step moves each parameter by
    lr, so each singular value moves by lr * sigma0 -- the same fraction whatever its size -- and s by lr;
    with absolute updates the same step moves every sigma by lr, a larger fraction of the small ones."""
    lr = 1e-2
    moved = {}
    for update in ("relative", "absolute"):
        model = svd_scale.apply(tiny_llama(), AdapterConfig(rank=4, target_modules=["q_proj"], sigma_update=update))
        model.train()
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, eps=1e-15)  # step = lr exactly
        model(tokens, labels=tokens).loss.backward()
        opt.step()
        _, layer = next(svd_scale.adapter_layers(model))
        t = {k: v.detach().double() for k, v in layer.fp32_tensors().items()}
        sigma = get_method("svd_scale").singular_values(t)
        moved[update] = ((sigma - t["sigma0"]).abs(), t["sigma0"], (t["scale"] - 1).abs())
    change, sigma0, change_s = moved["relative"]
    torch.testing.assert_close(change / sigma0, torch.full_like(change, lr), rtol=1e-3, atol=0)
    torch.testing.assert_close(change_s, torch.full_like(change_s, lr), rtol=1e-3, atol=0)
    change, sigma0, _ = moved["absolute"]  # lr each: a fraction lr / sigma0 that depends on the value
    torch.testing.assert_close(change, torch.full_like(change, lr), rtol=1e-3, atol=0)


def test_an_adapter_saved_before_relative_updates_loads_as_absolute(tokens, tmp_path):
    """Adapters written before the option existed name no sigma_update and hold ``sigma``: read as absolute."""
    import json

    model = svd_scale.apply(tiny_llama(), AdapterConfig(rank=6, sigma_update="absolute"))
    _perturb(model)
    expected = model(tokens).logits
    svd_scale.save_adapter(model, str(tmp_path))
    path = tmp_path / "svd_scale_adapter.json"
    meta = json.loads(path.read_text())
    assert meta["adapter"]["sigma_update"] == "absolute"  # every option is written with its value now
    del meta["adapter"]["sigma_update"]  # as an older svd_scale wrote it
    path.write_text(json.dumps(meta))
    loaded = svd_scale.load_adapter(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(loaded(tokens).logits, expected, atol=1e-5, rtol=0)
    fresh = svd_scale.apply(tiny_llama(), AdapterConfig(rank=6))  # today's default trains sigma_delta
    assert "sigma_delta" in dict(next(svd_scale.adapter_layers(fresh))[1].named_parameters())


def test_the_base_fingerprint_is_read_once_per_frozen_embedding(tmp_path, monkeypatch):
    """Every checkpoint save stamps the adapter with the base's fingerprint; a frozen embedding is read
    (under ZeRO-3/FSDP2: gathered) once, not at every save -- a trainable one every time -- and the
    stamp still tells another base apart."""
    import svd_scale.io as sio

    model = svd_scale.apply(tiny_llama(), AdapterConfig(rank=4))
    emb = model.get_input_embeddings().weight
    reads, full_value = [], sio.full_value
    monkeypatch.setattr(sio, "full_value", lambda p: (reads.append(p is emb), full_value(p))[1])
    first, again = sio.base_fingerprint(model), sio.base_fingerprint(model)
    assert first == again and reads == [True]
    emb.requires_grad_(True)
    sio.base_fingerprint(model)
    assert reads == [True, True]
    other = tiny_llama()
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(2)
    assert sio.fingerprint_mismatch(first, sio.base_fingerprint(other)) is not None
