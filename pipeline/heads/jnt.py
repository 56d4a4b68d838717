"""Jnt-ST: joint spatio-temporal enrichment, self-attention over all L*P patch tokens of a video (paper Table 3).

The paper's alternative to PLE + FLE: instead of attending within each frame (PLE) and then mixing
frames (FLE), every patch of every frame attends to every other one. Positional encoding: the
sinusoid PE (STRM_SPEC section 2) over the flattened token index l*P + p (frame-major, patches
row-major within a frame), added once before the first layer, so one code covers frame and patch.
Each layer is PLE's block (`SelfAttentionEnrich`: Q/K/V D x D projections, gamma-gated residual,
psi bottleneck MLP) without its own PE. The heads then average the P patches of each frame:
H = E [n, L, D], which feeds TRM.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.heads.pe import PositionalEncoding
from pipeline.heads.ple import SelfAttentionEnrich


class JointEnrich(nn.Module):
    """`layers` self-attention blocks over the L*P tokens of each video: x [..., L, P, D] -> [..., L, P, D]."""

    def __init__(
        self,
        dim: int,
        frames: int,
        patches: int,
        hidden: int,
        layers: int,
        *,
        scaled: bool = False,
        gamma_zero: bool = False,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.frames, self.patches = frames, patches
        tokens = frames * patches
        self.pe = PositionalEncoding(dim, int(tokens * 1.5), dropout)
        self.layers = nn.ModuleList(
            SelfAttentionEnrich(
                dim, tokens, hidden, scaled=scaled, gamma_zero=gamma_zero, dropout=dropout, positional=False
            )
            for _ in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.pe(x.flatten(-3, -2))
        for layer in self.layers:
            tokens = layer(tokens)
        return tokens.unflatten(-2, (self.frames, self.patches))
