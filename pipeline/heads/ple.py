"""PLE: patch-level enrichment, a self-attention block over the tokens of one frame (STRM_SPEC section 3).

x <- PE(x); alpha = gamma * softmax(Q K^T * scale) V + x; f = psi(alpha) + alpha, psi a bottleneck MLP
(D -> D/2 -> D/2 -> D, ReLU). The released code does not scale the attention (scale = 1), which the
authors' checkpoints depend on; `scaled=True` gives the paper's 1/sqrt(D). Q, K and V come from one
Linear(D, 3D) so the projection is one matmul and the attention one fused call. The same block,
applied over frames, is the "FLE as self-attention" swap of the paper's Table 4.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.heads.pe import PositionalEncoding


def bottleneck_mlp(dim: int, hidden: int) -> nn.Sequential:
    """psi: Linear(D, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, D); the caller adds the residual."""
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim)
    )


class SelfAttentionEnrich(nn.Module):
    """PLE's block over [..., tokens, D]; `gamma_zero` removes the attention branch (gamma forced to 0).

    `positional=False` leaves the positional encoding to the caller (the joint block of jnt.py adds
    it once, over all L*P tokens, before its first layer).
    """

    def __init__(
        self,
        dim: int,
        tokens: int,
        hidden: int,
        *,
        scaled: bool = False,
        gamma_zero: bool = False,
        dropout: float = 0.1,
        positional: bool = True,
    ) -> None:
        super().__init__()
        self.tokens = tokens
        self.scale = 1.0 / math.sqrt(dim) if scaled else 1.0
        self.pe = PositionalEncoding(dim, int(tokens * 1.5), dropout) if positional else None
        # gamma starts at 0 (released code): the block begins as psi alone and learns to attend.
        self.qkv = None if gamma_zero else nn.Linear(dim, 3 * dim)
        self.gamma = None if gamma_zero else nn.Parameter(torch.zeros(1))
        self.psi = bottleneck_mlp(dim, hidden)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """softmax(Q K^T * scale) V for already position-encoded tokens x [..., tokens, D]."""
        assert self.qkv is not None, "a gamma_zero block has no attention branch"
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v, scale=self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pe is not None:
            x = self.pe(x)
        if self.qkv is not None:
            assert self.gamma is not None  # built together with qkv
            x = self.gamma * self.attention(x) + x
        return self.psi(x) + x
