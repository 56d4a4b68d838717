"""What passes between the per-video and the cross-video halves of the heads: a video's embedding
(VideoEmbedding), the heads' output, and the support grouped by class (any number of shots).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch


def _row_index(index: torch.Tensor, rows: int, device: torch.device) -> torch.Tensor:
    """An integer index of any shape, flat, for index_select over `rows` rows: negative indices count
    from the end as in t[index] (rewritten without a device sync); out-of-range ones still raise."""
    flat = index.reshape(-1).to(device=device, dtype=torch.long)
    return torch.where(flat < 0, flat + rows, flat)


@dataclass(frozen=True)
class VideoEmbedding:
    """Per-video outputs of `encode`; every tensor's leading dims index videos (any shape, e.g. [n] or [B, n]).

    Per cardinality: trm_k and trm_v, the key (before LayerNorm, centred over channels) and value
    rows per tuple position and frame [.., w, L, D'] (`trm.tuple_sum` of them gives the tuples'
    projections, centred for keys; `TRM.keys` the keys); trm_k_rstd, each tuple's key LayerNorm
    1/std [.., T]; qc [.., T, D'']
    and its squared norms qc_norms [.., T] (empty without QC). tuples: the frame indices [T, w] of
    the tuples held (shared by all videos).
    ple_patches [.., L, P, D], H and E [.., L, D] only when `encode(..., intermediates=True)`.
    """

    trm_k: tuple[torch.Tensor, ...]
    trm_k_rstd: tuple[torch.Tensor, ...]
    trm_v: tuple[torch.Tensor, ...]
    qc: tuple[torch.Tensor, ...]
    qc_norms: tuple[torch.Tensor, ...]
    tuples: tuple[torch.Tensor, ...]
    ple_patches: torch.Tensor | None = None
    H: torch.Tensor | None = None
    E: torch.Tensor | None = None

    _PER_VIDEO = ("trm_k", "trm_k_rstd", "trm_v", "qc", "qc_norms", "ple_patches", "H", "E")

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> VideoEmbedding:
        changes: dict[str, Any] = {}
        for name in self._PER_VIDEO:
            value = getattr(self, name)
            if isinstance(value, tuple):
                changes[name] = tuple(fn(t) for t in value)
            elif value is not None:
                changes[name] = fn(value)
        return replace(self, **changes)

    def __getitem__(self, index) -> VideoEmbedding:
        """Select videos: `emb[idx]` with a LongTensor idx of any shape gives leading dims idx.shape.

        An integer tensor index is one `index_select` of whole rows (several times faster than
        advanced indexing `t[idx]` for the gathers of a task batch); anything else is `t[index]`.
        """
        if isinstance(index, torch.Tensor) and index.dtype in (torch.int64, torch.int32):  # not masks
            flat = _row_index(index, len(self), self.trm_k[0].device)  # once for every field
            return self._map(lambda t: t.index_select(0, flat).view(*index.shape, *t.shape[1:]))
        return self._map(lambda t: t[index])

    def __len__(self) -> int:
        return self.trm_k[0].shape[0]

    def to(self, *args, **kwargs) -> VideoEmbedding:
        """Tensor.to on every per-video tensor (the tuple indices follow the device)."""
        moved = self._map(lambda t: t.to(*args, **kwargs))
        device = moved.trm_k[0].device
        return replace(moved, tuples=tuple(t.to(device) for t in self.tuples))

    def detach(self) -> VideoEmbedding:
        return self._map(torch.Tensor.detach)

    @classmethod
    def cat(cls, parts: Sequence[VideoEmbedding]) -> VideoEmbedding:
        """Concatenate embeddings of disjoint video sets along the first dim (encoding in chunks)."""
        first = parts[0]
        joined: dict[str, Any] = {}
        for f in fields(cls):
            values = [getattr(p, f.name) for p in parts]
            if f.name == "tuples":
                joined[f.name] = first.tuples
            elif isinstance(values[0], tuple):
                joined[f.name] = tuple(torch.cat(ts) for ts in zip(*values, strict=False))
            elif values[0] is not None:
                joined[f.name] = torch.cat(values)
        return cls(**joined)


@dataclass(frozen=True)
class HeadsOutput:
    """Logits [.., n_q, way]: `logits` = trm_logits + lambda * qc_logits (TRM alone without QC).
    `known_score` [.., n_q]: a trained open-set head's score that the query is one of the support's
    actions (higher: more likely known); None for heads trained without one. `accept_logit` [.., n_q]:
    the discriminator's (disc) logit behind that score, which their loss reads."""

    logits: torch.Tensor
    trm_logits: torch.Tensor
    qc_logits: torch.Tensor | None
    known_score: torch.Tensor | None = None
    accept_logit: torch.Tensor | None = None


@dataclass(frozen=True)
class SupportGroups:
    """A task batch's support laid out by class: gathering `order` [B, way*shot] (None: already in that
    layout) makes it [B, way, shot]. Equal shots: `shot` per class and no mask. Uneven shots: `shot` is
    the largest count, each class padded to it with the task's support video 0 (any finite rows do),
    and shot_mask [B, way, shot] is False on that padding, which relate keeps out of TRM's softmax
    and QC's min."""

    order: torch.Tensor | None
    way: int
    shot: int
    shot_mask: torch.Tensor | None = None


def group_by_class(labels: torch.Tensor, way: int | None) -> SupportGroups:
    """The class layout of support labels [B, n_s]: integers 0..way-1 in any order, every class at
    least once in every task (`way` defaults to max label + 1).

    Decided once for the batch: when every class of every task has the same count, the dense layout
    without a mask (the equal-shot fast path); otherwise the padded one.
    """
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"support labels must be integer class indices, got dtype {labels.dtype}")
    batch, n_s = labels.shape
    if n_s == 0:
        raise ValueError("no support videos: every class needs at least one")
    labels = labels.long()
    low, high = torch.stack(torch.aminmax(labels)).tolist()
    if way is None:
        way = high + 1
    if low < 0 or high >= way:
        task, column = ((labels < 0) | (labels >= way)).nonzero()[0].tolist()
        raise ValueError(
            f"support labels must be class indices 0..{way - 1}; task {task} has label {int(labels[task, column])}"
        )
    counts = torch.zeros(batch, way, dtype=torch.long, device=labels.device).scatter_add_(
        1, labels, torch.ones_like(labels)
    )
    host_counts = counts.cpu()
    missing = (host_counts == 0).nonzero()
    if len(missing):
        task, absent = missing[0].tolist()
        raise ValueError(
            f"support labels must hold every class 0..{way - 1} at least once; task {task} lacks class {absent} "
            f"(label counts {host_counts[task].tolist()})"
        )
    shot = int(host_counts.max())
    sorted_labels, order = labels.sort(dim=-1, stable=True)
    if way * shot == n_s:  # each task's counts sum to n_s, so all of them equal the largest: equal shots
        if torch.equal(order, torch.arange(n_s, device=labels.device).expand_as(order)):
            return SupportGroups(None, way, shot)  # the episode sampler's layout: no gather needed
        return SupportGroups(order, way, shot)
    starts = counts.cumsum(dim=-1) - counts  # each class's first position in the sorted support [B, way]
    rank = torch.arange(n_s, device=labels.device) - starts.gather(1, sorted_labels)  # shot index within the class
    padded = order.new_zeros(batch, way * shot).scatter_(1, sorted_labels * shot + rank, order)
    shot_mask = torch.arange(shot, device=labels.device) < counts[..., None]
    return SupportGroups(padded, way, shot, shot_mask)
