"""Pure SVD math: decompose a weight, fix signs, build residuals.

Every function here is a function of tensors only -- no modules, no sharding, no
quantization -- so each can be tested alone against a float64 reference.

Conventions (``docs/methods.md``): a weight ``W`` is out x in; ``W = U diag(S) Vh``
with singular values descending; all decompositions run in fp32 (or float64 if
given float64) on the weight's own device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Algorithm = Literal["full", "randomized"]
ALGORITHMS = ("full", "randomized")

# svd_lowrank draws a Gaussian test matrix; a fixed seed on a forked RNG makes the
# same weight always give the same factors without touching the caller's RNG state.
_RANDOMIZED_SEED = 0


@dataclass(frozen=True)
class SVD:
    """Top (or bottom) singular triplets: U (out x k), S (k), Vh (k x in)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    @property
    def rank(self) -> int:
        return self.S.numel()

    def product(self) -> torch.Tensor:
        """``U diag(S) Vh`` -- the low-rank matrix these factors represent."""
        return (self.U * self.S) @ self.Vh


def fix_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic sign convention (as ``sklearn.utils.extmath.svd_flip``).

    Singular vectors are defined up to a joint sign flip of ``U[:, i]`` and ``Vh[i]``;
    LAPACK, cuSOLVER and the randomized algorithm pick different ones. We make the
    largest-magnitude entry of every column of ``U`` positive, so the same weight
    gives the same factors on any backend (up to ties in magnitude).
    """
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U.gather(0, idx.unsqueeze(0)).squeeze(0))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, Vh * signs.unsqueeze(1)


def _as_compute(W: torch.Tensor) -> torch.Tensor:
    return W if W.dtype == torch.float64 else W.float()


def _full_svd(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD; on CUDA with cuSOLVER's ``gesvda`` driver, several times faster than the default
    on 4096-wide weights (bench/results/init_time_H100.md). gesvda wants a tall matrix, so a wide one
    is decomposed transposed. It is approximate for the smallest singular values of
    ill-conditioned matrices; the top factors are what ``decompose`` keeps, and the residual
    is always formed from the kept factors, so ``residual + product == W`` regardless.
    (``decompose_bottom`` needs the smallest components exactly and keeps the default.)"""
    if A.device.type != "cuda":
        return torch.linalg.svd(A, full_matrices=False)
    tall = A.shape[0] >= A.shape[1]
    U, S, Vh = torch.linalg.svd(A if tall else A.mT, full_matrices=False, driver="gesvda")
    return (U, S, Vh) if tall else (Vh.mT, S, U.mT)


def decompose(
    W: torch.Tensor,
    rank: int,
    algorithm: Algorithm = "randomized",
    niter: int = 4,
    oversample: int = 8,
) -> SVD:
    """Top-``rank`` singular triplets of ``W`` in fp32, signs fixed.

    ``full`` uses ``torch.linalg.svd``; ``randomized`` uses ``torch.svd_lowrank``
    (Halko et al. 2011) with ``rank + oversample`` probe vectors and ``niter``
    power iterations, as PEFT does for PiSSA's fast init. The randomized factors are
    approximate, which is harmless here: residuals are always computed from the
    factors actually kept (:func:`residual`), so ``residual + product`` is ``W``.
    """
    out_f, in_f = W.shape
    k = min(out_f, in_f)
    if not 0 < rank <= k:
        raise ValueError(f"rank must be in 1..{k} for a {out_f}x{in_f} weight, got {rank}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"svd algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    A = _as_compute(W)
    if algorithm == "full" or rank + oversample >= k:
        U, S, Vh = _full_svd(A)
    else:
        devices = [A.device] if A.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(_RANDOMIZED_SEED)
            U, S, V = torch.svd_lowrank(A, q=rank + oversample, niter=niter)
        Vh = V.mT
    U, Vh = fix_signs(U[:, :rank], Vh[:rank])
    return SVD(U.contiguous(), S[:rank].contiguous(), Vh.contiguous())


def decompose_bottom(W: torch.Tensor, rank: int) -> tuple[SVD, SVD]:
    """Split ``W`` into its top ``min(out,in) - rank`` and bottom ``rank`` components.

    KaSA (Wang et al., ICLR 2025, Sec. 3.1) removes the ``rank`` *smallest*
    components, which needs the full SVD. Following the PEFT port (see docs/methods.md),
    ``rank`` must be below ``min(out, in)``. Returns ``(kept, removed)``.
    """
    k = min(W.shape)
    if not 0 < rank < k:
        raise ValueError(f"rank must be in 1..{k - 1} for a {tuple(W.shape)} weight (KaSA keeps at least one component), got {rank}")
    U, S, Vh = torch.linalg.svd(_as_compute(W), full_matrices=False)
    U, Vh = fix_signs(U, Vh)
    cut = k - rank
    return SVD(U[:, :cut], S[:cut], Vh[:cut]), SVD(U[:, cut:].contiguous(), S[cut:].contiguous(), Vh[cut:].contiguous())


def residual(W: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
    """``W - U diag(S) Vh`` in fp32 (float64 if ``W`` is), from the factors actually kept.

    Pass the factors *after* any cast to their storage dtype, so the stored residual
    plus the stored low-rank part reproduces ``W`` as closely as the storage allows.
    """
    A = _as_compute(W)
    return A - (U.to(A.dtype) * S.to(A.dtype)) @ Vh.to(A.dtype)


def low_rank_svd(B: torch.Tensor, A: torch.Tensor) -> SVD:
    """The exact thin SVD of ``B @ A`` (out x k times k x in) without forming it: QR of ``B`` and
    ``A^T``, then the SVD of the k x k core (O((out + in) k^2)). Used to shorten an exported LoRA."""
    Qb, Rb = torch.linalg.qr(_as_compute(B))
    Qa, Ra = torch.linalg.qr(_as_compute(A).mT)
    u, s, vh = torch.linalg.svd(Rb @ Ra.mT)
    return SVD(Qb @ u, s, vh @ Qa.mT)


def best_rank(D: SVD, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LoRA factors ``(B, A)`` of the first ``k`` triplets of ``D`` and the relative Frobenius error
    ``||D - B A|| / ||D||`` that the dropped ones leave (Eckart-Young, when ``D`` is exact)."""
    total = float(D.S.pow(2).sum())
    err = (float(D.S[k:].pow(2).sum()) / total) ** 0.5 if total > 0 else 0.0
    return D.U[:, :k] * D.S[:k], D.Vh[:k], err
