"""The same invariants over every method (like PEFT's test_custom_models.py), plus each
method's own formulas against float64 references."""
import math

import pytest
import torch

import svd_scale
from svd_scale import AdapterConfig, Role
from svd_scale.methods import METHODS
from svd_scale.methods.orthogonality import gram_deviation
from svd_scale.methods.salora import eval_gates, expected_l0, set_progress
from conftest import tiny_gpt2, tiny_llama

ALL = sorted(METHODS)
EXACT_INIT = [m for m in ALL if m != "kasa"]  # KaSA starts from the truncated weight (by design)


def _perturb(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g) * (p.abs().mean() + 0.05))


def _cfg(method, **kw):
    return AdapterConfig(method=method, rank=kw.pop("rank", 6), svd="full", **kw)


@pytest.mark.parametrize("method", EXACT_INIT)
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_init_reproduces_base_output(method, make, tokens):
    ref = make().double()(tokens).logits
    model = svd_scale.apply(make().double(), _cfg(method))
    torch.testing.assert_close(model(tokens).logits, ref, atol=1e-9, rtol=0)


def test_kasa_init_equals_the_truncated_weight_in_float64(tokens):
    r = 6
    ref_model = tiny_llama().double()
    targets = [m for n, m in ref_model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    with torch.no_grad():
        for m in targets:  # independent reference: drop the r smallest components with numpy-free float64 SVD
            U, S, Vh = torch.linalg.svd(m.weight, full_matrices=False)
            k = S.numel() - r
            m.weight.copy_((U[:, :k] * S[:k]) @ Vh[:k])
    model = svd_scale.apply(tiny_llama().double(), _cfg("kasa", rank=r))
    torch.testing.assert_close(model(tokens).logits, ref_model(tokens).logits, atol=1e-9, rtol=0)


@pytest.mark.parametrize("method", ALL)
def test_only_declared_trainables_get_gradients(method, tokens):
    model = svd_scale.apply(tiny_llama(), _cfg(method))
    _perturb(model)  # move LoRA-style B off zero so every trainable has a gradient path
    model.train()
    loss = model(tokens, labels=tokens).loss
    reg = svd_scale.regularization_loss(model)
    (loss + reg if reg is not None else loss).backward()
    declared = {f"{n}.{t}" for n, l in svd_scale.adapter_layers(model) for t, r in l.roles.items() if r is Role.TRAINABLE}
    if method == "salora":
        declared |= {"salora_budget.lambdas"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == declared
    assert {n for n, p in model.named_parameters() if p.grad is not None} == declared
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in declared)
    for _, l in svd_scale.adapter_layers(model):
        assert all(p.dtype == torch.float32 for p in l.tensors((Role.TRAINABLE,)).values())


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_merge_equals_unmerged(method, make, tokens):
    model = svd_scale.apply(make(), _cfg(method)).eval()
    _perturb(model)
    expected = model(tokens).logits
    merged = svd_scale.merge_and_unload(model)
    assert not any(isinstance(m, svd_scale.AdapterLayer) for m in merged.modules())
    torch.testing.assert_close(merged(tokens).logits, expected, atol=5e-5, rtol=0)


@pytest.mark.parametrize("method", ALL)
def test_save_load_round_trip(method, tokens, tmp_path):
    model = svd_scale.apply(tiny_llama(), _cfg(method)).eval()
    _perturb(model)
    expected = model(tokens).logits
    svd_scale.save_adapter(model, str(tmp_path / "a"))
    loaded = svd_scale.load_adapter(tiny_llama(), str(tmp_path / "a")).eval()
    torch.testing.assert_close(loaded(tokens).logits, expected, atol=1e-6, rtol=0)


def test_trainable_counts_follow_the_formulas():
    r = 6
    counts = {}
    for m in ALL:
        model = svd_scale.apply(tiny_llama(), _cfg(m, rank=r))
        layers = [l for _, l in svd_scale.adapter_layers(model)]
        counts[m] = (svd_scale.parameter_counts(model)[0], layers)
    layers = counts["svd_scale"][1]
    assert counts["svd_scale"][0] == sum(r + l.out_features for l in layers)
    assert counts["svfit"][0] == sum(r for _ in layers)
    assert counts["sorsa"][0] == sum(r * (l.out_features + l.in_features + 1) for l in layers)
    assert counts["kasa"][0] == sum(r * (l.out_features + l.in_features + 1) for l in layers)
    assert counts["salora"][0] == sum(r * (l.out_features + l.in_features + 1) for l in layers) + 2
    assert counts["pissa"][0] == counts["lora"][0] == sum(r * (l.out_features + l.in_features) for l in layers)


# ----------------------------------------------------------------------------- regularizers
def test_gram_deviation_against_float64():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(20, 4, generator=g)
    ref = torch.linalg.norm(M.double().T @ M.double() - torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(gram_deviation(M, columns=True).double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(gram_deviation(M.T, columns=False, squared=True).double(), ref ** 2, rtol=1e-5, atol=0)
    Q, _ = torch.linalg.qr(M)
    assert gram_deviation(Q, columns=True) < 1e-5


def test_sorsa_regularizer_zero_at_init_and_known_when_scaled():
    model = svd_scale.apply(tiny_llama(), _cfg("sorsa", gamma=0.5))
    _, layer = next(svd_scale.adapter_layers(model))
    assert layer.regularizer() < 1e-5  # singular vectors are orthonormal
    with torch.no_grad():
        layer.U_p.mul_(2.0)  # U^T U = 4 I  ->  ||3 I_r||_F = 3 sqrt(r)
    torch.testing.assert_close(layer.regularizer(), torch.tensor(0.5 * 3 * math.sqrt(6)), rtol=1e-4, atol=1e-5)
    total = svd_scale.regularization_loss(model)
    n = sum(1 for _ in svd_scale.adapter_layers(model))
    torch.testing.assert_close(total, layer.regularizer() / n, rtol=1e-3, atol=n * 1e-5)  # averaged over layers


def test_kasa_regularizer_formula():
    model = svd_scale.apply(tiny_llama(), _cfg("kasa", beta=0.1, gamma=0.01))
    _, l = next(svd_scale.adapter_layers(model))
    A, B, d = l.A.double(), l.B.double(), l.delta_sigma.double()
    I = torch.eye(6, dtype=torch.float64)
    ref = 0.1 * d.pow(2).sum() + 0.01 * (torch.linalg.norm(B.T @ B - I) + torch.linalg.norm(A @ A.T - I))
    torch.testing.assert_close(l.regularizer().double(), ref, rtol=1e-5, atol=1e-7)


def test_salora_gates_budget_and_ascent():
    model = svd_scale.apply(tiny_llama(), _cfg("salora", budget=0.5))
    layers = list(svd_scale.adapter_layers(model))
    assert all(torch.equal(eval_gates(l.log_alpha), torch.ones(6)) for _, l in layers)  # all open at init
    l0 = sum(expected_l0(l.log_alpha) for _, l in layers)
    budget = model.salora_budget
    assert budget.initial_total == 6 * len(layers)
    set_progress(model, 0.0)
    assert budget.target() == budget.initial_total
    set_progress(model, 1.0)
    assert budget.target() == pytest.approx(0.5 * budget.initial_total)
    with torch.no_grad():
        budget.lambdas.copy_(torch.tensor([0.3, 0.2]))
    term = budget.loss(l0)
    gap = l0 - budget.target()
    torch.testing.assert_close(term, 0.3 * gap + 0.2 * gap ** 2)
    term.backward()  # gradient ascent on the multipliers: their gradient is minus the gap terms
    torch.testing.assert_close(budget.lambdas.grad, -torch.stack([gap, gap ** 2]).detach())


def test_salora_export_drops_closed_gates_without_changing_output(tokens, tmp_path):
    model = svd_scale.apply(tiny_llama(), _cfg("salora")).eval()
    _perturb(model)
    with torch.no_grad():
        for i, (_, l) in enumerate(svd_scale.adapter_layers(model)):
            l.log_alpha[: 1 + i % 4] = -8.0  # gate exactly 0 at eval
    expected = model(tokens).logits
    svd_scale.save_adapter(model, str(tmp_path / "s"))
    _, meta = svd_scale.io.read_adapter_config(str(tmp_path / "s"))
    ranks = [v["rank"] for v in meta["layers"].values()]
    assert ranks == [6 - (1 + i % 4) for i in range(len(ranks))]
    loaded = svd_scale.load_adapter(tiny_llama(), str(tmp_path / "s")).eval()
    assert [l.A.shape[0] for _, l in svd_scale.adapter_layers(loaded)] == ranks
    torch.testing.assert_close(loaded(tokens).logits, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ALL)
def test_bad_rank_for_each_method(method):
    hi = 31 if method == "kasa" else 32  # k_proj is 32 x 64
    with pytest.raises(ValueError, match=f"needs 1 <= rank <= {hi}"):
        svd_scale.apply(tiny_llama(), AdapterConfig(method=method, rank=hi + 1))


@pytest.mark.parametrize("method", ALL)
def test_every_method_with_an_nf4_residual(method, tokens):
    """Quantization is the residual's storage, independent of the method: every method
    trains over a 4-bit residual and merges back to a plain model with the same outputs."""
    from svd_scale.quant.nf4 import is_4bit
    model = svd_scale.apply(tiny_llama(), _cfg(method, quant="nf4"))
    assert all(is_4bit(l.base_layer) for _, l in svd_scale.adapter_layers(model))
    model.train()
    loss = model(tokens, labels=tokens).loss
    reg = svd_scale.regularization_loss(model)
    (loss + reg if reg is not None else loss).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    _perturb(model)
    expected = model(tokens).logits
    torch.testing.assert_close(svd_scale.merge_and_unload(model)(tokens).logits, expected, atol=5e-5, rtol=0)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from svd_scale.builtin import smollm2_path
    tok = AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id)).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.mark.parametrize("method", ALL)
def test_launch_train_runs_every_method(method, tiny_model_dir, tmp_path):
    """`launch/train.py method=<name>` end to end: trains, lowers the loss it logs, saves an
    adapter that loads back onto the base."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    cmd = [sys.executable, str(root / "launch" / "train.py"), "--config", str(root / "configs" / "quickstart.yaml"),
           f"model={tiny_model_dir}", f"method={method}", "rank=4", "train.max_steps=6", "train.logging_steps=1",
           "train.eval_examples=32", "train.max_length=48", "train.lr=5e-3", f"train.output_dir={out}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == method and len(m["losses"]) == 6 and m["accuracy_after"] is not None
    assert m["dtypes"]["trainable"] == ["torch.float32"]
    from transformers import AutoModelForCausalLM
    loaded = svd_scale.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out / "adapter"))
    assert loaded.svd_scale_config.method == method
