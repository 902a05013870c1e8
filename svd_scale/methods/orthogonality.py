"""Pure orthogonality penalties shared by SORSA, KaSA and SaLoRA.

Always formed from r x r Gram matrices in fp32 (docs/methods.md: KaSA's official code
builds in x in Grams, which costs memory for nothing).
"""
from __future__ import annotations

import torch


def gram_deviation(M: torch.Tensor, columns: bool, squared: bool = False) -> torch.Tensor:
    """``||M^T M - I||_F`` (``columns=True``, M is n x r) or ``||M M^T - I||_F`` (M is r x n);
    squared Frobenius norm if ``squared``."""
    M = M.float()
    G = M.T @ M if columns else M @ M.T
    D = G - torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    sq = D.pow(2).sum()
    return sq if squared else sq.clamp_min(1e-24).sqrt()
