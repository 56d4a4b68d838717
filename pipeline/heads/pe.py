"""Sinusoidal positional encoding scaled by 0.1, then dropout (STRM_SPEC section 2).

Used over the 16 patches in PLE, over the 8 frames in FLE and again over the frames in each TRM.
The table is a non-persistent buffer: it is a pure function of (dim, max_len), so checkpoints
do not carry it and the importer only checks the authors' copy against it.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoid_table(dim: int, max_len: int, scale: float = 0.1) -> torch.Tensor:
    """pe[pos, 2i] = scale sin(pos / 10000^(2i/dim)), pe[pos, 2i+1] = scale cos(..): [max_len, dim]."""
    position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim)
    table[:, 0::2] = torch.sin(position * div_term) * scale
    table[:, 1::2] = torch.cos(position * div_term[: dim // 2]) * scale
    return table


class PositionalEncoding(nn.Module):
    """x <- dropout(x + pe[:len]) over the second-to-last axis (tokens); dropout only in training."""

    pe: torch.Tensor  # registered as a buffer in __init__

    def __init__(self, dim: int, max_len: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.max_len = max_len
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("pe", sinusoid_table(dim, max_len), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[-2]
        if tokens > self.max_len:
            raise ValueError(f"positional encoding holds {self.max_len} positions, got {tokens} tokens")
        return self.dropout(x + self.pe[:tokens])
