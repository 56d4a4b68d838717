"""FLE: frame-level enrichment, an MLP-mixer without norms over the frames of a video (STRM_SPEC section 4).

x <- PE(x); token mixing x <- x + MLP_L(x^T)^T (Linear(L, L) -> ReLU -> Linear(L, L), shared over
channels); channel mixing E = x + MLP_D(x) (Linear(D, D) -> ReLU -> Linear(D, D), shared over frames).
ReLU, not GELU, and no LayerNorm, as released. Applied over the patches of a frame it is the
"PLE as mixer" swap of the paper's Table 4.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.heads.pe import PositionalEncoding


def two_layer_mlp(width: int) -> nn.Sequential:
    """Linear(w, w) -> ReLU -> Linear(w, w)."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))


class MixerEnrich(nn.Module):
    """FLE's block over [..., tokens, D]: token mixing then channel mixing, each with a residual."""

    def __init__(self, dim: int, tokens: int, *, dropout: float = 0.1) -> None:
        super().__init__()
        self.tokens = tokens
        self.pe = PositionalEncoding(dim, int(tokens * 1.5), dropout)
        self.token_mlp = two_layer_mlp(tokens)
        self.channel_mlp = two_layer_mlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pe(x)
        x = x + self.token_mlp(x.transpose(-1, -2)).transpose(-1, -2)
        return x + self.channel_mlp(x)
