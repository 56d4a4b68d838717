"""Open-set heads and losses: what lets the STRM heads say "none of the support's actions" (issue #23).

Why a bounded scale first: TRM's logit is minus a squared distance, and cross-entropy on it rewards
growing every distance without end (a right answer then costs nothing, a wrong one thousands), so
confidence stops meaning anything and an unknown query lands as far from everything as a known
one. Every method here trains on `bounded` logits instead: each query's logits divided by its mean
distance to the task's classes, times a learned temperature capped at MAX_SCALE. Prediction is
unchanged (a positive factor per query keeps the argmax), and the loss no longer pays for scale.

`bounded` is that alone: closed-set training on bounded logits, no unknown queries, no score of its
own (post-hoc scores such as the best raw logit then apply). For the others, training tasks hold unknown
queries (label UNKNOWN = -1) from other training classes; each method adds its term on them and fills
`HeadsOutput.known_score` (higher: more likely one of the actions):
- eos (Entropic Open-set loss): the unknown queries' softmax pushed toward uniform (mean negative
  log-softmax over the classes); score: the largest softmax probability.
- garbage: a learned extra class whose logit is a linear function of each query's bounded logits
  (largest, mean, logsumexp: any way); unknown queries are trained to it; score: 1 - its probability.
- disc (FR-Disc): a small discriminator on TRM's residual v_q - prototype for the predicted class
  (per-tuple MLP on the residual divided by the query's mean residual norm, dropout, concatenated,
  sigmoid); positives: correctly classified known queries, negatives: as many unknown queries.
Measured on the demo's cache (README "Open-set training"): `bounded` alone gives most of the gain in
accuracy and in AUROC of the best raw logit; garbage and disc add about 0.01 AUROC with a score of
their own; eos lowers it. A design fed with each action's leave-one-out spread inside the task did not
help and was removed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("none", "bounded", "eos", "garbage", "disc")
UNKNOWN = -1  # a query's label when its class is not among the task's (pipeline.data.episodes.UNKNOWN)
MAX_SCALE = 30.0  # the bounded logits' temperature never exceeds this (a query's logits span <= way * it)
DISC_HIDDEN, DISC_OUT = 32, 4  # per-tuple MLP widths of the discriminator


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"open_set {method!r}: expected one of {', '.join(METHODS)}")
    return method


class OpenSetHead(nn.Module):
    """The learned temperature of the bounded logits (TRM's and QC's) and a method's own parameters."""

    def __init__(self, method: str, trm_dim: int, tuples: int) -> None:
        super().__init__()
        self.method = check_method(method)
        self.log_scale = nn.Parameter(torch.full((2,), math.log(10.0)))  # TRM, QC
        if method == "garbage":  # starts as logsumexp(bounded logits) - 2: a garbage probability near 0.12
            self.garbage = nn.Linear(3, 1)
            with torch.no_grad():
                self.garbage.weight.copy_(torch.tensor([[0.0, 0.0, 1.0]]))
                self.garbage.bias.fill_(-2.0)
        if method == "disc":
            self.tuple_mlp = nn.Sequential(
                nn.Linear(trm_dim + 1, DISC_HIDDEN), nn.GELU(), nn.Dropout(0.1), nn.Linear(DISC_HIDDEN, DISC_OUT)
            )
            self.accept = nn.Linear(tuples * DISC_OUT, 1)

    def scale(self, which: int = 0) -> torch.Tensor:
        return self.log_scale[which].exp().clamp(max=MAX_SCALE)

    def bounded(self, logits: torch.Tensor, which: int = 0) -> torch.Tensor:
        """logits [.., way] (minus distances) / each query's mean distance, times the temperature."""
        return logits / logits.abs().mean(-1, keepdim=True).clamp_min(1e-12) * self.scale(which)

    def garbage_logit(self, bounded: torch.Tensor) -> torch.Tensor:
        """The garbage class's logit [..] from a query's bounded logits [.., way]."""
        stats = torch.stack([bounded.amax(-1), bounded.mean(-1), bounded.logsumexp(-1)], dim=-1)
        return self.garbage(stats).squeeze(-1)

    def disc_logit(self, residual: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        """Accept logits [B, n_q] from TRM residuals [B, n_q, way, T, D'] and predicted classes [B, n_q]."""
        scale = residual.square().sum(-1).mean((-2, -1), keepdim=True).clamp_min(1e-12).sqrt()  # [B, n_q, 1, 1]
        index = predicted[..., None, None, None].expand(-1, -1, 1, *residual.shape[-2:])
        chosen = residual.gather(2, index).squeeze(2) / scale  # [B, n_q, T, D']
        per_tuple = self.tuple_mlp(torch.cat([chosen, chosen.square().sum(-1, keepdim=True)], dim=-1))
        return self.accept(per_tuple.flatten(-2)).squeeze(-1)

    def known_score(self, logits: torch.Tensor, accept_logit: torch.Tensor | None) -> torch.Tensor:
        """Higher = more likely one of the task's actions [.., n_q] (see the module docstring)."""
        if self.method == "eos":
            return self.bounded(logits).softmax(-1).amax(-1)
        if self.method == "garbage":
            bounded = self.bounded(logits)
            return 1 - torch.cat([bounded, self.garbage_logit(bounded)[..., None]], -1).softmax(-1)[..., -1]
        assert accept_logit is not None  # disc computes its own in relate
        return torch.sigmoid(accept_logit)


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    return values.sum() if reduction == "sum" else values.mean()


def _balanced_bce(logit: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, reduction: str) -> torch.Tensor:
    """Binary cross-entropy, positives (1) and negatives (0) each reduced on their own, then added."""
    loss = logit.new_zeros(())
    if positive.any():
        loss = loss + _reduce(F.softplus(-logit[positive]), reduction)
    if negative.any():
        loss = loss + _reduce(F.softplus(logit[negative]), reduction)
    return loss


def open_set_loss(
    head: OpenSetHead,
    trm_logits: torch.Tensor,
    qc_logits: torch.Tensor | None,
    logits: torch.Tensor,
    accept_logit: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    lambda_qc: float,
    weight: float,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of the known queries on bounded logits (L_TM + lambda L_QC) plus `weight` times the
    method's term on the unknown queries (label UNKNOWN). Shapes: logits [.., n_q, way], labels [.., n_q]."""
    way = trm_logits.shape[-1]
    flat = labels.reshape(-1)
    known, unknown = flat >= 0, flat == UNKNOWN

    def closed(raw: torch.Tensor, which: int) -> torch.Tensor:
        bounded = head.bounded(raw.reshape(-1, way).float(), which)[known]
        return F.cross_entropy(bounded, flat[known], reduction=reduction) if known.any() else bounded.sum() * 0

    loss = closed(trm_logits, 0)
    if qc_logits is not None and lambda_qc:
        loss = loss + lambda_qc * closed(qc_logits, 1)
    if not weight or head.method == "bounded":
        return loss
    combined = head.bounded(logits.reshape(-1, way).float())
    if head.method == "eos":
        term = -combined[unknown].log_softmax(-1).mean(-1) if unknown.any() else combined.sum()[None] * 0
        return loss + weight * _reduce(term, reduction)
    if head.method == "garbage":
        extended = torch.cat([combined, head.garbage_logit(combined)[:, None]], dim=-1)
        target = torch.where(unknown, torch.full_like(flat, way), flat)
        return loss + weight * F.cross_entropy(extended, target, reduction=reduction)
    assert accept_logit is not None
    accept = accept_logit.reshape(-1).float()
    # disc: positives, the correctly classified known queries; negatives, as many unknown ones
    positive = known & (logits.reshape(-1, way).argmax(-1) == flat.clamp_min(0))
    negative = unknown & (unknown.cumsum(0) <= max(int(positive.sum()), 1))
    return loss + weight * _balanced_bce(accept, positive, negative, reduction)
