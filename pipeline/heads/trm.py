"""TRM: the temporal relationship module (TRX's cross-transformer), one per tuple cardinality (STRM_SPEC section 5).

Per video: x <- PE(E); every ordered frame tuple (itertools.combinations, lexicographic) becomes the
concatenation of its frames; k = LayerNorm(Linear_k(tuple)), v = Linear_v(tuple). Across videos:
each query tuple attends over all tuples of all shots of a class (softmax over K*T, scaled by
1/sqrt(D')), the attention-weighted support values are the query-specific prototype, and the logit
is -||v_q - prototype||_F^2 / T.

Speed: Linear(w*D, D') of a concatenation is the sum of w per-position projections, so each frame
is projected once per tuple position (w*L rows, `frame_projections`) and a tuple's projection is the
sum of its frames' rows (`tuple_sum`). The cross-video step never forms a tuple's key or value,
only per-frame rows (16 instead of 28 per video at L = 8 pairs):
- values are linear: a prototype is the attention summed onto each (position, frame) row of the
  class (a product with a 0/1 matrix), times those rows;
- keys are LayerNorm(x) = rstd * g * (x - mean(x)) + beta. Centring is linear too, so the key rows
  are kept centred over channels (`centred_projections`): a tuple's sum of rows is then x - mean(x)
  itself, and with rstd per tuple (`key_rstd`), k_q . k_s = rstd_q * rstd_s * (g^2 x_q) . x_s +
  rstd_s * (g beta) . x_s + terms without s, which the softmax over support tuples drops. Both
  products are sums over rows: one matmul of the query's rows (times g^2) and g * beta with the
  support rows. No mean is subtracted across a product, so nothing cancels there.
All query rows of a task meet all its support rows in one matmul, then a softmax per class.
"""

from __future__ import annotations

import itertools
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.heads.pe import PositionalEncoding


def frame_tuples(frames: int, cardinality: int) -> torch.Tensor:
    """All `cardinality`-tuples of frame indices in lexicographic order: LongTensor [T, w]."""
    if not 1 <= cardinality <= frames:
        raise ValueError(f"tuple cardinality must be in 1..{frames} for {frames} frames, got {cardinality}")
    return torch.tensor(list(itertools.combinations(range(frames), cardinality)), dtype=torch.long)


def frame_projections(x: torch.Tensor, linear: nn.Linear, width: int) -> torch.Tensor:
    """Each frame projected by the columns of `linear` that act on tuple position p: x [n, L, D] ->
    [n, w, L, out], the bias added at position 0, so `tuple_sum` of it is linear(concatenated tuple)."""
    n, frames, dim = x.shape
    out_dim = linear.weight.shape[0]
    # Row o*w + p of weight.view(out*w, D) holds the columns acting on a tuple's p-th frame: one matmul
    # projects every frame for every tuple position, with no copy of the weight.
    per_frame = F.linear(x, linear.weight.view(out_dim * width, dim)).view(n, frames, out_dim, width)
    bias = F.pad(linear.bias.view(1, 1, out_dim), (0, 0, 0, 0, 0, width - 1))  # [w, 1, out], zero after p = 0
    return per_frame.permute(0, 3, 1, 2) + bias  # contiguous [n, w, L, out]


def tuple_sum(per_frame: torch.Tensor, tuples: torch.Tensor) -> torch.Tensor:
    """Sum over positions p of per_frame[..., p, tuples[:, p], :]: [..., w, L, C], tuples [T, w] -> [..., T, C]."""
    out = per_frame.select(-3, 0).index_select(-2, tuples[:, 0])
    for position in range(1, tuples.shape[1]):
        out = out + per_frame.select(-3, position).index_select(-2, tuples[:, position])
    return out


def tuple_linear(x: torch.Tensor, linear: nn.Linear, tuples: torch.Tensor) -> torch.Tensor:
    """linear(concat of the frames of each tuple) for x [n, L, D], tuples [T, w] -> [n, T, out]."""
    return tuple_sum(frame_projections(x, linear, tuples.shape[1]), tuples)


def tuple_selection(tuples: torch.Tensor, frames: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """0/1 matrix [T, w*L]: row t has a one at p*L + tuples[t, p] for each position p."""
    width = tuples.shape[1]
    columns = tuples + frames * torch.arange(width, device=tuples.device)
    return torch.zeros(len(tuples), width * frames, dtype=dtype, device=tuples.device).scatter_(1, columns, 1.0)


def centred_projections(x: torch.Tensor, linear: nn.Linear, width: int) -> torch.Tensor:
    """`frame_projections` with each row centred over its channels: `tuple_sum` of them is then a
    tuple's projection minus its channel mean, the centring LayerNorm does."""
    rows = frame_projections(x, linear, width)
    return rows - rows.mean(dim=-1, keepdim=True)


def key_rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm's 1/sqrt(var + eps) over the last dim: x [..., C] -> [...]."""
    return (torch.var(x, dim=-1, correction=0) + eps).rsqrt()


class TRM(nn.Module):
    """Per-frame key rows (centred) and value rows of one cardinality and its tuples' key 1/std (see
    the module docstring); `relate_trm` does the cross-video step."""

    tuples: torch.Tensor  # registered as a buffer in __init__

    def __init__(self, dim: int, frames: int, cardinality: int, out_dim: int, *, dropout: float = 0.1) -> None:
        super().__init__()
        self.cardinality = cardinality
        self.pe = PositionalEncoding(dim, int(frames * 1.5), dropout)
        self.register_buffer("tuples", frame_tuples(frames, cardinality), persistent=False)
        self.k_linear = nn.Linear(cardinality * dim, out_dim)
        self.v_linear = nn.Linear(cardinality * dim, out_dim)
        # The released code also builds norm_v but never applies it: not created here.
        self.norm_k = nn.LayerNorm(out_dim)

    def forward(
        self, frames: torch.Tensor, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """frames [n, L, D] -> (centred key rows [n, w, L, D'], key 1/std [n, T], value rows [n, w, L, D']);
        `keep` selects tuple indices (retention)."""
        x = self.pe(frames)
        tuples = self.tuples if keep is None else self.tuples[keep]
        k_rows = centred_projections(x, self.k_linear, self.cardinality)
        rstd = key_rstd(tuple_sum(k_rows, tuples), self.norm_k.eps)
        return k_rows, rstd, frame_projections(x, self.v_linear, self.cardinality)

    def keys(self, k_rows: torch.Tensor, tuples: torch.Tensor) -> torch.Tensor:
        """The tuples' keys LayerNorm(x) [..., T, D'] from key rows [..., w, L, D'], for inspection
        (`relate_trm` never forms them)."""
        norm = self.norm_k
        return F.layer_norm(tuple_sum(k_rows, tuples), norm.normalized_shape, norm.weight, norm.bias, norm.eps)


# Tasks a step on CPU: at most this many prototype elements (4 MB of float32), so that one task's
# prototypes [way, n_q*T, D'] (3.2 MB at 5-way 5 queries D'=1152) are still in cache when the
# reduction reads them back: 1.3x faster than one step for 20 tasks. Other devices take all at once.
CPU_STEP_ELEMENTS = 1 << 20


def mask_padded_shots(values: torch.Tensor, shot_mask: torch.Tensor, fill: float) -> torch.Tensor:
    """values [B, X, way, K, Y] with `fill` wherever shot_mask [B, way, K] is False: how the padded
    [way, max K] layout of uneven shots keeps its padding out of a softmax (-inf) or a min (+inf)."""
    return values.masked_fill(~shot_mask[:, None, :, :, None], fill)


def relate_trm(
    trm: TRM,
    query_k: torch.Tensor,
    query_rstd: torch.Tensor,
    query_v: torch.Tensor,
    query_tuples: torch.Tensor,
    class_k: torch.Tensor,
    class_rstd: torch.Tensor,
    class_v: torch.Tensor,
    class_tuples: torch.Tensor,
    shot_mask: torch.Tensor | None = None,
    residual: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """TRM logits [B, n_q, way] from the query's centred key rows [B, n_q, w, L, D'], key 1/std
    [B, n_q, T_q] and value rows, and the classes' key rows [B, way, K, w, L, D'], key 1/std
    [B, way, K, T_s] and value rows; each side's tuples [T, w] are those its encode kept (the same,
    except under random retention in training). Uneven shots come padded to K with shot_mask
    [B, way, K] (False: padding, any finite rows), whose tuples then get attention exactly 0."""
    batch, n_q = query_k.shape[:2]
    frames, width = query_k.shape[-2:]
    t_q = len(query_tuples)
    query_selection = tuple_selection(query_tuples, frames, query_k.dtype)
    class_selection = tuple_selection(class_tuples, frames, class_k.dtype)
    g, beta = trm.norm_k.weight, trm.norm_k.bias
    # g^2 times each query row, then g * beta: their products with a support row are the two terms
    # of k_q . k_s that depend on the support tuple (module docstring).
    left = torch.cat([(query_k * (g * g)).reshape(batch, -1, width), (g * beta).expand(batch, 1, width)], dim=1)
    query_v = torch.matmul(query_selection, query_v.flatten(2, 3))  # the query's value tuples [B, n_q, T_q, D']
    step = batch
    if query_k.device.type == "cpu":
        step = max(1, CPU_STEP_ELEMENTS // max(1, class_k.shape[1] * n_q * t_q * width))
    parts = [
        _relate_trm_tasks(
            left[i : i + step],
            query_selection,
            query_rstd[i : i + step],
            query_v[i : i + step],
            class_k[i : i + step],
            class_rstd[i : i + step],
            class_v[i : i + step],
            class_selection,
            None if shot_mask is None else shot_mask[i : i + step],
            residual,
        )
        for i in range(0, batch, step)
    ]
    if residual:
        pairs = cast("list[tuple[torch.Tensor, torch.Tensor]]", parts)
        logits = torch.cat([p[0] for p in pairs])
        return logits, torch.cat([p[1] for p in pairs]).view(batch, -1, n_q, t_q, width).transpose(1, 2)
    alone = cast("list[torch.Tensor]", parts)
    return alone[0] if len(alone) == 1 else torch.cat(alone)


def _relate_trm_tasks(
    left: torch.Tensor,
    query_selection: torch.Tensor,
    query_rstd: torch.Tensor,
    query_v: torch.Tensor,
    class_k: torch.Tensor,
    class_rstd: torch.Tensor,
    class_v: torch.Tensor,
    class_selection: torch.Tensor,
    shot_mask: torch.Tensor | None,
    residual: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`relate_trm` for a group of tasks: `left` holds g^2 times each query key row, then g * beta
    [B, n_q*w*L + 1, D']; the query's key 1/std [B, n_q, T_q] and value tuples [B, n_q, T_q, D'].

    One matmul multiplies those rows with all key rows of the task's classes; the 0/1 selection
    matrices then sum rows into tuples on both sides. The attention of each query tuple on the
    tuples of a shot, times the class selection [T_s, w*L], is the weight of each of the shot's
    value rows, so the prototypes are one product with those rows.
    """
    batch, n_q, t_q = query_rstd.shape
    width = left.shape[-1]
    way, shots = class_k.shape[1:3]
    rows_per_shot = class_selection.shape[1]
    per_class = shots * class_selection.shape[0]
    products = torch.bmm(left, class_k.reshape(batch, way * shots * rows_per_shot, width).transpose(1, 2))
    # Support tuples: each tuple's rows summed, as one product with the 0/1 matrix (an index_select
    # along the last dim is several times slower) -> [B, rows + 1, way * K * T_s].
    dots = torch.matmul(products.view(batch, -1, way * shots, rows_per_shot), class_selection.T).flatten(2)
    # Query tuples: (g^2 x_q) . x_s [B, n_q*T_q, way*K*T_s]; the last row of dots is (g beta) . x_s.
    pair = torch.matmul(query_selection, dots[:, :-1].view(batch, n_q, rows_per_shot, -1)).flatten(1, 2)
    # k_q . k_s / sqrt(D') up to terms without s: rstd_s * (rstd_q * pair + (g beta) . x_s) / sqrt(D').
    scores = torch.addcmul(dots[:, -1:], pair, query_rstd.reshape(batch, -1, 1)) * (
        class_rstd.reshape(batch, 1, -1) * width**-0.5
    )
    if shot_mask is not None:  # uneven shots: padded shots' tuples out of the softmax (weight exactly 0)
        scores = mask_padded_shots(scores.view(batch, n_q * t_q, way, shots, -1), shot_mask, -torch.inf)
    weights = scores.view(batch, n_q * t_q, way, per_class).softmax(dim=-1)  # over the class's K*T_s tuples
    rows = torch.matmul(weights.view(batch, n_q * t_q, way * shots, -1), class_selection)  # [B, M, way*K, w*L]
    rows = rows.view(batch, n_q * t_q, way, shots * rows_per_shot).transpose(1, 2)  # [B, way, M, K*w*L]
    # prototype - v_q in place (matmul's backward does not need its output); the norm is the same
    # as that of v_q - prototype, bit for bit.
    values = class_v.reshape(batch, way, shots * rows_per_shot, width)
    diff = torch.matmul(rows, values).sub_(query_v.reshape(batch, 1, n_q * t_q, width))
    squared = torch.linalg.vector_norm(diff, dim=-1).square()  # a reduction: no second [.., D'] temporary
    distance = squared.view(batch, way, n_q, t_q).sum(-1) / t_q
    if residual:  # prototype - v_q above: its negation is the residual [B, way, n_q*T_q, D']
        return -distance.transpose(1, 2), -diff
    return -distance.transpose(1, 2)


def trm_attention_weights(
    query_k: torch.Tensor, class_k: torch.Tensor, shot_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax over support tuples of k_q . k_s / sqrt(D'): query_k [n_q, T_q, D'], class_k [way, K*T_s, D']
    -> [n_q, way, T_q, K*T_s]; shot_mask [way, K] (uneven shots, False: padding) gives padding weight 0.
    For inspection of one task (the forward uses the fused call)."""
    scores = torch.einsum("qtd,cjd->qctj", query_k, class_k) / query_k.shape[-1] ** 0.5
    if shot_mask is not None:
        per_shot = class_k.shape[1] // shot_mask.shape[1]
        scores = scores.masked_fill(~shot_mask.repeat_interleave(per_shot, dim=1)[None, :, None, :], -torch.inf)
    return scores.softmax(dim=-1)
