"""CUDA paths (skipped without a GPU; run on the lent H100 through the device tool):
the gesvda full SVD, the fused layer in bf16, and an NF4 residual dequantized to bf16."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("shape", [(96, 40), (40, 96)])
def test_full_svd_on_cuda_matches_float64(shape):
    from svd_scale.svd import decompose

    W = torch.randn(*shape, dtype=torch.float64) / torch.arange(1, shape[1] + 1) ** 0.5
    f = decompose(W.float().cuda(), 8, algorithm="full")
    S_ref = torch.linalg.svdvals(W)[:8]
    torch.testing.assert_close(f.S.double().cpu(), S_ref, rtol=1e-5, atol=0)
    eye = torch.eye(8, device="cuda")
    torch.testing.assert_close(f.U.T @ f.U, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(f.Vh @ f.Vh.T, eye, atol=1e-5, rtol=0)
    P_ref = (lambda u, s, v: (u[:, :8] * s[:8]) @ v[:8])(*torch.linalg.svd(W, full_matrices=False))
    torch.testing.assert_close(f.product().double().cpu(), P_ref, atol=1e-4, rtol=0)


def test_fused_layer_bf16_on_cuda_close_to_float64():
    from svd_scale.methods.svd_scale import fused_forward, plain_forward

    g = torch.Generator().manual_seed(0)
    h, x = torch.randn(4, 128, 352, generator=g), torch.randn(4, 128, 256, generator=g)
    Vh, U, sigma, s = torch.randn(16, 256, generator=g), torch.randn(352, 16, generator=g), torch.rand(16, generator=g), 1 + 0.1 * torch.randn(352, generator=g)
    ref = plain_forward(*(t.double() for t in (h, x, Vh, U, sigma, s)))
    cu = [t.cuda() for t in (h, x, Vh, U)]
    y = fused_forward(*(t.bfloat16() for t in cu), sigma.cuda().requires_grad_(), s.cuda().requires_grad_())
    assert y.dtype == torch.bfloat16
    assert ((y.double().cpu() - ref).norm() / ref.norm()).item() < 1e-2


def test_nf4_model_on_cuda_equals_base_and_trains():
    pytest.importorskip("bitsandbytes")
    import copy

    import svd_scale
    from svd_scale.inject import _set_module, find_targets
    from svd_scale.quant.nf4 import linear4bit_from
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=512)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    x = torch.randint(0, 512, (2, 64), device="cuda")
    with torch.no_grad():
        base = model(input_ids=x).logits.float()
        plain = copy.deepcopy(model)  # every target weight stored as plain NF4: the error to beat
        for name, m in find_targets(plain, "all-linear"):
            _set_module(plain, name, linear4bit_from(m, m.weight.float(), torch.bfloat16, False))
        plain_err = ((plain(input_ids=x).logits.float() - base).norm() / base.norm()).item()
    svd_scale.apply(model, svd_scale.AdapterConfig(rank=16, quant="nf4"))
    lin = model.model.layers[0].mlp.down_proj.base_layer
    assert type(lin).__name__ == "Linear4bit" and lin.weight.quant_state.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(input_ids=x).logits.float()
    # the 4-bit residual changes the output by its quantization error only: no more than storing W in NF4
    err = ((out - base).norm() / base.norm()).item()
    assert err < plain_err, (err, plain_err)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and {n.rsplit(".", 1)[1] for n in trained} == {"sigma_delta", "scale"}
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


def test_compiled_blocks_train_like_eager_on_cuda_in_bf16():
    """train.compile's path (engines.base.compile_blocks) on the GPU, where it is meant to run: a bf16 model
    over an NF4 residual, gradient checkpointing, AdamW; the compiled run follows the eager one."""
    pytest.importorskip("bitsandbytes")
    import copy

    import svd_scale
    from svd_scale.engines.base import compile_blocks
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=512)
    eager = svd_scale.apply(LlamaForCausalLM(cfg).to("cuda", torch.bfloat16),
                            svd_scale.AdapterConfig(rank=16, quant="nf4", quant_iters=1))
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    x = torch.randint(0, 512, (2, 64), device="cuda")
    losses = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses[name] = []
        for _ in range(4):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[name].append(loss.item())
    assert losses["eager"][-1] < losses["eager"][0]  # it trained
    torch.testing.assert_close(torch.tensor(losses["compiled"]), torch.tensor(losses["eager"]), rtol=2e-2, atol=0)
