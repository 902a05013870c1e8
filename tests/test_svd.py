"""Unit tests of the pure SVD math against float64 references."""
import pytest
import torch

from svd_scale import svd


def _weight(out_f=48, in_f=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g, dtype=dtype)


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
def test_full_svd_matches_float64_reference(shape):
    W = _weight(*shape)
    f = svd.decompose(W, rank=8, algorithm="full")
    ref = torch.linalg.svdvals(W.double())
    torch.testing.assert_close(f.S.double(), ref[:8], rtol=1e-5, atol=1e-5)
    # rank-8 product is the best rank-8 approximation: its error is the tail energy (Eckart-Young)
    err = torch.linalg.norm(W.double() - f.product().double())
    torch.testing.assert_close(err, ref[8:].pow(2).sum().sqrt(), rtol=1e-4, atol=1e-5)
    # orthonormal columns/rows
    torch.testing.assert_close(f.U.T @ f.U, torch.eye(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(f.Vh @ f.Vh.T, torch.eye(8), atol=1e-5, rtol=0)


@pytest.mark.parametrize("algorithm", ["full", "randomized"])
def test_residual_plus_factors_reproduces_weight(algorithm):
    W = _weight(64, 40)
    f = svd.decompose(W, rank=6, algorithm=algorithm, niter=2)
    R = svd.residual(W, f.U, f.S, f.Vh)
    torch.testing.assert_close(R + f.product(), W, atol=1e-5, rtol=0)
    # the residual is exact in float64 too (randomized factors are approximate, the split is not)
    R64 = svd.residual(W.double(), f.U, f.S, f.Vh)
    P64 = (f.U.double() * f.S.double()) @ f.Vh.double()
    torch.testing.assert_close(R64 + P64, W.double(), atol=1e-12, rtol=0)


def test_randomized_close_to_full_on_a_low_rank_plus_noise_weight():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(80, 8, generator=g) @ torch.randn(8, 60, generator=g) * 3 + 0.01 * torch.randn(80, 60, generator=g)
    full = svd.decompose(W, 8, "full")
    rnd = svd.decompose(W, 8, "randomized", niter=4)
    torch.testing.assert_close(rnd.S, full.S, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(rnd.U.abs(), full.U.abs(), atol=1e-2, rtol=0)


def test_sign_convention_is_deterministic_and_backend_independent():
    W = _weight()
    a = svd.decompose(W, 5, "full")
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    U2, Vh2 = svd.fix_signs(-U[:, :5], -Vh[:5])  # the opposite sign choice maps to the same factors
    torch.testing.assert_close(U2, a.U)
    torch.testing.assert_close(Vh2, a.Vh)
    b = svd.decompose(W, 5, "randomized")
    c = svd.decompose(W, 5, "randomized")
    assert torch.equal(b.U, c.U) and torch.equal(b.Vh, c.Vh)
    idx = a.U.abs().argmax(0)
    assert (a.U[idx, torch.arange(5)] > 0).all()


def test_randomized_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    svd.decompose(_weight(), 4, "randomized")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("rank", [0, -1, 33])
def test_bad_rank_raises(rank):
    with pytest.raises(ValueError, match="rank must be in 1..32"):
        svd.decompose(_weight(48, 32), rank)


def test_bad_algorithm_raises():
    with pytest.raises(ValueError, match="full"):
        svd.decompose(_weight(), 4, algorithm="qr")


def test_decompose_bottom_splits_into_kept_and_smallest():
    W = _weight(40, 24)
    kept, removed = svd.decompose_bottom(W, 4)
    ref = torch.linalg.svdvals(W.double())
    torch.testing.assert_close(removed.S.double(), ref[-4:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kept.product() + removed.product(), W, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="1..23"):
        svd.decompose_bottom(W, 24)
