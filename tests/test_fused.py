"""The fused svd_scale layer (ScaledLowRank) against the plain formula: values and
gradients in float64 (gradcheck), and in bf16 against a float64 plain_forward."""
import pytest
import torch

from svd_scale.methods.svd_scale import ScaledLowRank, fused_forward, plain_forward


def _inputs(dtype, scale=True, bias=True, n=(2, 5), out=7, inp=6, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    h, x = mk(*n, out), mk(*n, inp)
    Vh, U, sigma = mk(r, inp), mk(out, r), mk(r).abs() + 0.5
    s = (1 + 0.3 * mk(out)) if scale else None
    b = mk(out) if bias else None
    return [h, x, Vh, U, sigma, s, b]


@pytest.mark.parametrize("scale,bias", [(True, True), (True, False), (False, False)])
def test_values_and_gradients_match_the_formula_in_float64(scale, bias):
    args = _inputs(torch.float64, scale, bias)
    for i in (0, 1, 4, 5):  # h, x, sigma, scale: what gets gradients in training
        if args[i] is not None:
            args[i].requires_grad_(True)
    torch.testing.assert_close(fused_forward(*args), plain_forward(*args), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *a: ScaledLowRank.apply(*a), tuple(args), eps=1e-6, atol=1e-7)
    # and against autograd through the plain_forward, gradient by gradient
    gy = torch.randn_like(args[0])
    want = torch.autograd.grad(plain_forward(*args), [a for a in args if a is not None and a.requires_grad], gy)
    got = torch.autograd.grad(fused_forward(*args), [a for a in args if a is not None and a.requires_grad], gy)
    for w, o in zip(want, got):
        torch.testing.assert_close(o, w, rtol=1e-12, atol=1e-12)


def test_frozen_factors_get_no_gradient_and_fp32_params_keep_fp32_grads():
    h, x, Vh, U, sigma, s, b = _inputs(torch.bfloat16)
    sigma, s = sigma.float().requires_grad_(True), s.float().requires_grad_(True)
    x.requires_grad_(True)
    y = fused_forward(h, x, Vh, U, sigma, s, b)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert sigma.grad.dtype == torch.float32 and s.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert not Vh.requires_grad and U.grad is None


def test_bf16_gradients_close_to_a_float64_plain_forward():
    """bf16 activations: sigma/scale gradients reduced in fp32 stay within bf16 rounding
    of the float64 truth (relative error well below 1e-2)."""
    args = _inputs(torch.bfloat16, n=(4, 64), out=96, inp=80, r=8)
    ref = [a.double() if a is not None else None for a in args]
    for t in (args, ref):
        t[4] = t[4].float() if t is args else t[4]
        t[5] = t[5].float() if t is args else t[5]
        t[4].requires_grad_(True)
        t[5].requires_grad_(True)
    gy = torch.randn(args[0].shape, dtype=torch.float64)
    want = torch.autograd.grad(plain_forward(*ref), [ref[4], ref[5]], gy)
    got = torch.autograd.grad(fused_forward(*args), [args[4], args[5]], gy.to(torch.bfloat16))
    for w, o in zip(want, got):
        assert ((o.double() - w).norm() / w.norm()).item() < 1e-2


def test_fused_switch_gives_the_same_model_outputs_and_gradients(tokens=None):
    import svd_scale
    from svd_scale.methods.svd_scale import SVDScaleLayer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    model = LlamaForCausalLM(cfg).double()
    svd_scale.apply(model, svd_scale.AdapterConfig(rank=4))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.mul_(1 + 0.1 * torch.randn_like(p))  # move away from init so every term matters
    x = torch.randint(0, 64, (2, 9))
    res = {}
    try:
        for fused in (False, True):
            SVDScaleLayer.fused = fused
            model.zero_grad()
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            res[fused] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    finally:
        SVDScaleLayer.fused = False
    torch.testing.assert_close(res[True][0], res[False][0], rtol=1e-12, atol=0)
    for n, g in res[False][1].items():
        torch.testing.assert_close(res[True][1][n], g, rtol=1e-9, atol=1e-12)
