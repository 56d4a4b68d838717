"""TRM: the temporal relationship module (TRX's cross-transformer), one per tuple cardinality (STRM_SPEC section 5).

Per video: x <- PE(E); every ordered frame tuple (itertools.combinations, lexicographic) becomes the
concatenation of its frames; k = LayerNorm(Linear_k(tuple)), v = Linear_v(tuple). Across videos:
each query tuple attends over all tuples of all shots of a class (softmax over K*T, scaled by
1/sqrt(D')), the attention-weighted support values are the query-specific prototype, and the logit
is -||v_q - prototype||_F^2 / T.

Speed: Linear(w*D, D') of a concatenation is the sum of w per-position projections, so each frame
is projected once (L rows) and tuples are formed by gathering (T rows): 3.5x fewer flops for pairs.
The cross-video step scores all query tuples of a task against all its support tuples in one
matmul, then a softmax and a values product per class; nothing of size n_q x way x T x K*T x D'
is formed.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.heads.pe import PositionalEncoding


def frame_tuples(frames: int, cardinality: int) -> torch.Tensor:
    """All `cardinality`-tuples of frame indices in lexicographic order: LongTensor [T, w]."""
    if not 1 <= cardinality <= frames:
        raise ValueError(f"tuple cardinality must be in 1..{frames} for {frames} frames, got {cardinality}")
    return torch.tensor(list(itertools.combinations(range(frames), cardinality)), dtype=torch.long)


def tuple_linear(x: torch.Tensor, linear: nn.Linear, tuples: torch.Tensor) -> torch.Tensor:
    """linear(concat of the frames of each tuple) for x [n, L, D], tuples [T, w] -> [n, T, out]."""
    n, frames, dim = x.shape
    width = tuples.shape[1]
    out_dim = linear.weight.shape[0]
    # Row o*w + i of weight.view(out*w, D) holds the columns acting on a tuple's i-th frame: one matmul
    # projects every frame for every tuple position, with no copy of the weight.
    per_frame = F.linear(x, linear.weight.view(out_dim * width, dim)).view(n, frames, out_dim, width)
    out = linear.bias
    for position in range(width):
        out = out + per_frame[..., position].index_select(1, tuples[:, position])
    return out


class TRM(nn.Module):
    """Keys and values of one cardinality's tuples; `relate_trm` does the cross-video step."""

    def __init__(self, dim: int, frames: int, cardinality: int, out_dim: int, *, dropout: float = 0.1) -> None:
        super().__init__()
        self.cardinality = cardinality
        self.pe = PositionalEncoding(dim, int(frames * 1.5), dropout)
        self.register_buffer("tuples", frame_tuples(frames, cardinality), persistent=False)
        self.k_linear = nn.Linear(cardinality * dim, out_dim)
        self.v_linear = nn.Linear(cardinality * dim, out_dim)
        # The released code also builds norm_v but never applies it: not created here.
        self.norm_k = nn.LayerNorm(out_dim)

    def forward(self, frames: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """frames [n, L, D] -> (k, v), each [n, T, D']; `keep` selects tuple indices (retention)."""
        x = self.pe(frames)
        tuples = self.tuples if keep is None else self.tuples[keep]
        return self.norm_k(tuple_linear(x, self.k_linear, tuples)), tuple_linear(x, self.v_linear, tuples)


# Tasks a step on CPU: at most this many prototype elements (4 MB of float32), so that one task's
# prototypes [way, n_q*T, D'] (3.2 MB at 5-way 5 queries D'=1152) are still in cache when the
# reduction reads them back: 1.3x faster than one step for 20 tasks. Other devices take all at once.
CPU_STEP_ELEMENTS = 1 << 20


def relate_trm(
    query_k: torch.Tensor, query_v: torch.Tensor, class_k: torch.Tensor, class_v: torch.Tensor
) -> torch.Tensor:
    """TRM logits [B, n_q, way] from query k/v [B, n_q, T_q, D'] and class k/v [B, way, K*T_s, D']."""
    batch, n_q, t_q, width = query_k.shape
    step = batch
    if query_k.device.type == "cpu":
        step = max(1, CPU_STEP_ELEMENTS // max(1, class_k.shape[1] * n_q * t_q * width))
    if step >= batch:
        return _relate_trm_tasks(query_k, query_v, class_k, class_v)
    parts = [
        _relate_trm_tasks(query_k[i : i + step], query_v[i : i + step], class_k[i : i + step], class_v[i : i + step])
        for i in range(0, batch, step)
    ]
    return torch.cat(parts)


def _relate_trm_tasks(
    query_k: torch.Tensor, query_v: torch.Tensor, class_k: torch.Tensor, class_v: torch.Tensor
) -> torch.Tensor:
    """`relate_trm` for a group of tasks: the scores of all query tuples of a task against all its
    classes' support tuples are one matmul [n_q*T_q, way*K*T_s] (larger, so faster, than one per
    class: 1.7x with the steps below over the fused per-class attention call), then a softmax per
    class and the per-class products with the values."""
    batch, n_q, t_q, width = query_k.shape
    way, per_class = class_k.shape[1], class_k.shape[2]
    queries = query_k.reshape(batch, n_q * t_q, width)
    scores = torch.bmm(queries, class_k.reshape(batch, way * per_class, width).transpose(1, 2))
    scores = scores.mul_(width**-0.5)  # in place: bmm's backward needs its inputs, not its output
    weights = scores.view(batch, n_q * t_q, way, per_class).softmax(dim=-1).transpose(1, 2)  # [B, way, M, K*T_s]
    # prototype - v_q in place (matmul's backward does not need its output either); the norm is
    # the same as that of v_q - prototype, bit for bit.
    diff = torch.matmul(weights, class_v).sub_(query_v.reshape(batch, 1, n_q * t_q, width))
    squared = torch.linalg.vector_norm(diff, dim=-1).square()  # a reduction: no second [.., D'] temporary
    distance = squared.view(batch, way, n_q, t_q).sum(-1) / t_q
    return -distance.transpose(1, 2)


def trm_attention_weights(query_k: torch.Tensor, class_k: torch.Tensor) -> torch.Tensor:
    """softmax over support tuples of k_q . k_s / sqrt(D'): query_k [n_q, T_q, D'], class_k [way, K*T_s, D']
    -> [n_q, way, T_q, K*T_s]. For inspection of one task (the forward uses the fused call)."""
    scores = torch.einsum("qtd,cjd->qctj", query_k, class_k) / query_k.shape[-1] ** 0.5
    return scores.softmax(dim=-1)
