"""4-bit NF4 residual (bitsandbytes, CPU): accuracy vs plain NF4, gradients, merge, save/load."""
import pytest
import torch

import svd_scale
from svd_scale import AdapterConfig
from svd_scale.inject import find_targets
from svd_scale.quant.nf4 import is_4bit, linear4bit_from, nf4_roundtrip, refine_factors
from svd_scale import svd as svdlib
from conftest import tiny_gpt2, tiny_llama

FIRST_LAYERS = r"model\.layers\.[0-3]\..*_proj"  # keeps the real-model test fast on 2 cores


def test_nf4_residual_is_closer_to_the_base_than_plain_nf4_on_smollm2(smollm2_path):
    from transformers import AutoModelForCausalLM

    def load():
        return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()

    x = torch.tensor([[1, 504, 3301, 314, 253, 1345, 28, 2724, 30, 820, 2111, 281, 3582, 30]])
    with torch.no_grad():
        ref = load()(x).logits
        plain = load()
        for name, m in find_targets(plain, FIRST_LAYERS):  # plain NF4 of the same layers
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent), child, linear4bit_from(m, m.weight.detach().float(), torch.float32, False))
        err_plain = (plain(x).logits - ref).norm()
        ours = svd_scale.apply(load(), AdapterConfig(rank=64, quant="nf4", target_modules=FIRST_LAYERS))
        assert all(is_4bit(l.base_layer) for _, l in svd_scale.adapter_layers(ours))
        err_ours = (ours(x).logits - ref).norm()
    assert err_ours < 0.9 * err_plain, (float(err_ours), float(err_plain))


def test_refinement_error_is_measured_honestly():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(96, 8, generator=g) @ torch.randn(8, 64, generator=g) + 0.3 * torch.randn(96, 64, generator=g)
    fn = lambda A, r: svdlib.decompose(A, r, "full")  # noqa: E731
    f1, e1 = refine_factors(W, 8, 1, fn)
    f3, e3 = refine_factors(W, 8, 3, fn)
    plain = float(torch.linalg.norm(W - nf4_roundtrip(W)) / torch.linalg.norm(W))
    for f, e in ((f1, e1), (f3, e3)):  # the reported error is the real reconstruction error
        low = f.product()
        assert e == pytest.approx(float(torch.linalg.norm(W - nf4_roundtrip(W - low) - low) / torch.linalg.norm(W)), rel=1e-5)
    assert e3 <= e1 < plain


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_nf4_only_sigma_and_scale_train_and_stay_fp32(make, tokens):
    model = svd_scale.apply(make().to(torch.bfloat16), AdapterConfig(rank=8, quant="nf4"))
    model.train()
    model(tokens, labels=tokens).loss.backward()
    expected = {f"{n}.{t}" for n, _ in svd_scale.adapter_layers(model) for t in ("sigma_delta", "scale")}
    assert {n for n, p in model.named_parameters() if p.grad is not None} == expected
    for _, l in svd_scale.adapter_layers(model):
        assert l.sigma_delta.dtype == torch.float32 and l.sigma_delta.grad.dtype == torch.float32
        assert l.base_layer.weight.dtype == torch.bfloat16  # 4-bit codes in bf16 storage, never cast
        assert l.base_layer.weight.quant_state is not None


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_nf4_merge_gives_a_plain_model_with_the_same_outputs(make, tokens, tmp_path):
    model = svd_scale.apply(make(), AdapterConfig(rank=8, quant="nf4")).eval()
    with torch.no_grad():
        for _, l in svd_scale.adapter_layers(model):
            l.sigma_delta.add_(0.2)  # sigma = 1.2 sigma0
            l.scale.add_(0.05)
    expected = model(tokens).logits
    merged = svd_scale.merge_and_unload(model)
    assert not any(is_4bit(m) or isinstance(m, svd_scale.AdapterLayer) for m in merged.modules())
    # fp32 compute: dequant(W_res) + delta folded into one fp32 weight -- equal up to fp32 rounding
    torch.testing.assert_close(merged(tokens).logits, expected, atol=5e-5, rtol=0)
    merged.save_pretrained(tmp_path / "m")
    from transformers import AutoModelForCausalLM
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()(tokens).logits, expected,
                               atol=5e-5, rtol=0)


def test_nf4_bf16_merge_is_within_bf16_tolerance(tokens):
    model = svd_scale.apply(tiny_llama().to(torch.bfloat16), AdapterConfig(rank=8, quant="nf4")).eval()
    expected = model(tokens).logits.float()
    merged = svd_scale.merge_and_unload(model)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    # the adapted model adds two bf16 products, the merged one rounds their sum once:
    # both are within a few bf16 ulps of the logits' scale
    assert (merged(tokens).logits.float() - expected).abs().max() < 3e-2 * expected.abs().max()


def test_nf4_save_load_round_trip_requantizes_identically(tokens, tmp_path):
    model = svd_scale.apply(tiny_llama(), AdapterConfig(rank=8, quant="nf4", quant_iters=3)).eval()
    with torch.no_grad():
        for _, l in svd_scale.adapter_layers(model):
            l.sigma_delta.sub_(0.1)
    expected = model(tokens).logits
    svd_scale.save_adapter(model, str(tmp_path / "a"))
    loaded = svd_scale.load_adapter(tiny_llama(), str(tmp_path / "a")).eval()
    assert all(is_4bit(l.base_layer) for _, l in svd_scale.adapter_layers(loaded))
    assert torch.equal(loaded(tokens).logits, expected)


def test_quant_iters_needs_nf4():
    with pytest.raises(ValueError, match=r"refines a quantized residual: adapter.quant=.none. is not quantized"):
        AdapterConfig(quant_iters=3)
