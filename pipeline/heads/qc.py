"""QC: the query-class similarity classifier on H, the PLE output before FLE (STRM_SPEC section 6).

Per video: dropout(H) (training only, no PE), the same tuples as TRM, z = relu(Linear(w*D, D/2)).
Across videos: for each query tuple the Euclidean distance to the nearest tuple of any shot of the
class, averaged over query tuples; logit = -that mean. Registered as a normal submodule (the
released code kept it in a Python list: never trained, never saved, dropout active at test).

The nearest-tuple search uses squared distances from one batched matmul: ||b||^2 - 2ab for every
support tuple b (the squared norms kept per video by `encode`, so a task never reads its support
embeddings twice), the minimum over the class, then + ||a||^2, clamped at 0, and only then the
square root, with a gradient that stays finite at distance 0.

A frozen model's evaluation can instead take, for each (query video, support video) pair, each query
tuple's squared distance to its nearest tuple of that video (`nearest_block` fills such a table for
a whole split); the minimum over a class is then the minimum over its shots (`relate_qc_nearest`).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.heads.trm import frame_tuples, mask_padded_shots, tuple_linear


class QC(nn.Module):
    """Tuple embeddings of one cardinality for the min-distance classifier."""

    tuples: torch.Tensor  # registered as a buffer in __init__

    def __init__(self, dim: int, frames: int, cardinality: int, out_dim: int, *, dropout: float = 0.1) -> None:
        super().__init__()
        self.cardinality = cardinality
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("tuples", frame_tuples(frames, cardinality), persistent=False)
        self.proj = nn.Linear(cardinality * dim, out_dim)

    def forward(self, frames: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """H [n, L, D] -> (z [n, T, D''], ||z||^2 [n, T]); `keep` selects tuple indices (retention)."""
        tuples = self.tuples if keep is None else self.tuples[keep]
        z = torch.relu(tuple_linear(self.dropout(frames), self.proj, tuples))
        return z, _squared_norm(z)


def _sqrt_finite_grad(squared: torch.Tensor) -> torch.Tensor:
    """sqrt of a non-negative tensor whose gradient is 0, not inf/NaN, where the value is 0."""
    positive = squared > 0
    return torch.where(positive, squared.clamp_min(torch.finfo(squared.dtype).tiny).sqrt(), 0.0)


def _squared_norm(x: torch.Tensor) -> torch.Tensor:
    """||x||^2 over the last dim as one reduction (no temporary the size of x)."""
    return torch.linalg.vector_norm(x, dim=-1).square()


def relate_qc(
    query_z: torch.Tensor,
    query_norms: torch.Tensor,
    class_z: torch.Tensor,
    class_norms: torch.Tensor,
    shot_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """QC logits [B, n_q, way] from query z [B, n_q, T_q, C] with squared norms [B, n_q, T_q] and
    class z [B, way, K*T_s, C] with squared norms [B, way, K*T_s]. Uneven shots come padded to K with
    shot_mask [B, way, K] (False: padding, any finite z): a padded tuple's norm becomes +inf, so its
    every distance is +inf and never the minimum (masking the norms, not the [.., K*T_s] distances)."""
    batch, n_q, t_q, width = query_z.shape
    way, per_class = class_z.shape[1], class_z.shape[2]
    if shot_mask is not None:
        shots = shot_mask.shape[2]
        class_norms = mask_padded_shots(class_norms.reshape(batch, 1, way, shots, -1), shot_mask, torch.inf)
    queries = query_z.reshape(batch, n_q * t_q, width)
    support = class_z.reshape(batch, way * per_class, width)
    partial = torch.baddbmm(
        class_norms.reshape(batch, 1, way * per_class), queries, support.transpose(1, 2), alpha=-2.0
    )
    nearest = partial.view(batch, n_q, t_q, way, per_class).amin(dim=-1) + query_norms.unsqueeze(-1)
    return _logits(nearest)


def relate_qc_nearest(nearest: torch.Tensor, shot_mask: torch.Tensor | None = None) -> torch.Tensor:
    """QC logits [B, n_q, way] from each query tuple's squared distance to the nearest tuple of each
    support video, grouped by class: [B, n_q, way, K, T_q]; uneven shots padded to K with shot_mask
    [B, way, K] (False: padding, left out of the min)."""
    if shot_mask is not None:
        nearest = mask_padded_shots(nearest, shot_mask, torch.inf)
    return _logits(nearest.amin(dim=3).transpose(2, 3))


def nearest_block(
    z_a: torch.Tensor, norms_a: torch.Tensor, z_b: torch.Tensor, norms_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance from each tuple of each video of block a to its nearest tuple of each video of
    block b, and the other way round, from one product: z_a [m, T_a, C] with squared norms [m, T_a],
    z_b [n, T_b, C] -> ([m, n, T_a], [n, m, T_b])."""
    m, t_a, width = z_a.shape
    n, t_b = z_b.shape[:2]
    squared = torch.addmm(norms_b.reshape(1, -1), z_a.reshape(-1, width), z_b.reshape(-1, width).T, alpha=-2.0)
    squared = squared.add_(norms_a.reshape(-1, 1)).view(m, t_a, n, t_b)
    return squared.amin(dim=3).transpose(1, 2), squared.amin(dim=1).transpose(0, 1)


def _logits(nearest: torch.Tensor) -> torch.Tensor:
    """-mean over query tuples of the distance to the class's nearest tuple: [B, n_q, T_q, way] squared
    distances -> [B, n_q, way]."""
    return -_sqrt_finite_grad(nearest.clamp_min(0.0)).mean(dim=2)
