"""The STRM heads assembled by variant: standardise -> PLE -> H -> FLE -> E -> TRM per cardinality, QC on H.
(Jnt-ST, Table 3: one joint attention over all L*P tokens in place of PLE and FLE, then H = E.)

Everything up to TRM's per-frame key and value rows (with each tuple's key LayerNorm 1/std)
and the QC embeddings depends on one video alone (`encode`); only `relate` mixes support and query
videos. Evaluation encodes each test video once and relates
batches of tasks; training calls `forward`, which is `relate(encode(support), labels, encode(query))`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.heads.embedding import HeadsOutput, VideoEmbedding, group_by_class
from pipeline.heads.fle import MixerEnrich
from pipeline.heads.jnt import JointEnrich
from pipeline.heads.openset import OpenSetHead, check_method, open_set_loss
from pipeline.heads.ple import SelfAttentionEnrich
from pipeline.heads.qc import QC, relate_qc, relate_qc_nearest
from pipeline.heads.trm import TRM, relate_trm, trm_attention_weights
from pipeline.heads.variants import DEFAULT_OPTIONS, ENRICHMENTS, VARIANTS

if TYPE_CHECKING:
    from pipeline.heads.checkpoint import ImportReport

# set_feature_stats: channels at or below the absolute floor are left unscaled; the others are
# divided by at least this fraction of the median std (see its docstring).
STD_ABSOLUTE_FLOOR = 1e-6
STD_RELATIVE_FLOOR = 1e-2


def _unflatten(t: torch.Tensor, lead: Sequence[int]) -> torch.Tensor:
    """Leading dim back to `lead` (VideoEmbedding._map passes only the tensors that are set)."""
    return t.reshape(*lead, *t.shape[1:])


def _mean(logits: list[torch.Tensor]) -> torch.Tensor:
    """The mean over cardinalities of their logits (one cardinality: itself, no copy)."""
    return logits[0] if len(logits) == 1 else torch.stack(logits).mean(0)


def _resolve(variant: str, dim: int, options: dict) -> dict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown heads variant {variant!r}; known: {', '.join(VARIANTS)}")
    known = set(DEFAULT_OPTIONS) | set(VARIANTS[variant]) | {"open_set"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown heads option(s) {unknown}; known: {sorted(known)}")
    resolved = {**DEFAULT_OPTIONS, **VARIANTS[variant], **options}
    if dim < 2:
        raise ValueError(f"feature dim must be >= 2, got {dim}")
    for block in ("ple", "fle"):
        if resolved[block] not in ENRICHMENTS:
            raise ValueError(f"{block} must be one of {ENRICHMENTS}, got {resolved[block]!r}")
    joint = resolved["joint"]
    if joint is not None:
        if isinstance(joint, bool) or not isinstance(joint, int) or joint < 1:
            raise ValueError(f"joint must be a number of layers >= 1 or None, got {joint!r}")
        if resolved["ple"] is not None or resolved["fle"] is not None:
            raise ValueError("joint replaces PLE and FLE: set ple=None and fle=None with it")
    cards = tuple(sorted({int(w) for w in resolved["cardinalities"]}))
    if not cards:
        raise ValueError("at least one tuple cardinality is needed")
    resolved["cardinalities"] = cards
    if not 0.0 < float(resolved["tuple_keep"]) <= 1.0:
        raise ValueError(f"tuple_keep must be in (0, 1], got {resolved['tuple_keep']}")
    resolved["psi_dim"] = resolved["psi_dim"] or dim // 2
    resolved["qc_dim"] = resolved["qc_dim"] or dim // 2
    resolved["qc"] = bool(resolved["qc"])
    if check_method(resolved.pop("open_set", "none")) != "none":  # heads without one keep their options as before
        resolved["open_set"] = options["open_set"]
    return resolved


class STRMHeads(nn.Module):
    """PLE/FLE enrichment, TRM per cardinality and the optional QC classifier (see module docstring)."""

    feature_mean: torch.Tensor  # buffers registered in __init__
    feature_std: torch.Tensor
    # Set only on heads read from an authors' file (`checkpoint.load_authors_checkpoint`).
    backbone_state_dict: dict[str, torch.Tensor]
    import_report: ImportReport

    def __init__(self, variant: str = "strm", dim: int = 2048, **options) -> None:
        super().__init__()
        opts = _resolve(variant, dim, options)
        self.variant, self.dim = variant, dim
        self.frames, self.patches = opts["frames"], opts["patches"]
        self.cardinalities: tuple[int, ...] = opts["cardinalities"]
        self.lambda_qc = float(opts["lambda_qc"])
        self.tuple_keep = float(opts["tuple_keep"])
        # The build_heads kwargs, fully resolved: what a checkpoint needs to rebuild this module.
        self.options: dict[str, Any] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()}

        self.register_buffer("feature_mean", torch.zeros(dim))
        self.register_buffer("feature_std", torch.ones(dim))
        self.ple = self._enrichment(opts["ple"], self.patches, opts)
        self.fle = self._enrichment(opts["fle"], self.frames, opts)
        self.joint = (
            None
            if opts["joint"] is None
            else JointEnrich(
                dim,
                self.frames,
                self.patches,
                opts["psi_dim"],
                opts["joint"],
                scaled=opts["scaled_attention"],
                gamma_zero=opts["gamma_zero"],
                dropout=opts["dropout"],
            )
        )
        self.trm = nn.ModuleList(
            TRM(dim, self.frames, w, opts["trm_dim"], dropout=opts["dropout"]) for w in self.cardinalities
        )
        self.qc = (
            nn.ModuleList(QC(dim, self.frames, w, opts["qc_dim"], dropout=opts["dropout"]) for w in self.cardinalities)
            if opts["qc"]
            else None
        )
        # The trained open-set head (pipeline/heads/openset.py) and its method; None: closed-set heads.
        self.open_set = None
        if "open_set" in opts:
            kept = sum(max(1, round(self.tuple_keep * len(cast(TRM, t).tuples))) for t in self.trm)
            self.open_set = OpenSetHead(opts["open_set"], opts["trm_dim"], kept)

    def _enrichment(self, kind: str | None, tokens: int, opts: dict) -> nn.Module | None:
        if kind == "attention":
            return SelfAttentionEnrich(
                self.dim,
                tokens,
                opts["psi_dim"],
                scaled=opts["scaled_attention"],
                gamma_zero=opts["gamma_zero"],
                dropout=opts["dropout"],
            )
        if kind == "mixer":
            return MixerEnrich(self.dim, tokens, dropout=opts["dropout"])
        return None

    @property
    def has_qc(self) -> bool:
        return self.qc is not None

    @property
    def open_set_method(self) -> str:
        """The open-set method the heads were trained with ("none": closed-set heads)."""
        return "none" if self.open_set is None else self.open_set.method

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-channel standardisation applied at the start of `encode` (training-split statistics).

        Channels with std <= 1e-6 (e.g. ReLU channels that are always 0) are centred but not scaled.
        The others are divided by max(std, 1e-2 * median std of those channels): the gradient that
        reaches the backbone through a channel is scaled by 1/std, and a near-constant channel
        (std 3e-5 on a random backbone) would otherwise get ~10^4 times the typical gradient and
        blow up end-to-end fine-tuning; with the floor no channel is amplified more than 100x
        beyond a typical one.
        """
        mean = torch.as_tensor(mean, dtype=self.feature_mean.dtype).flatten()
        std = torch.as_tensor(std, dtype=self.feature_std.dtype).flatten()
        if mean.shape != (self.dim,) or std.shape != (self.dim,):
            raise ValueError(f"feature stats must be [{self.dim}], got {tuple(mean.shape)} and {tuple(std.shape)}")
        varying = std > STD_ABSOLUTE_FLOOR
        if varying.any():
            std = torch.where(varying, std.clamp_min(STD_RELATIVE_FLOOR * std[varying].median()), std)
        with torch.no_grad():
            self.feature_mean.copy_(mean)
            self.feature_std.copy_(torch.where(varying, std, torch.ones_like(std)))

    def kept_tuples(self, cardinality_index: int) -> torch.Tensor | None:
        """Indices of the tuples kept (Fig. 6 right), or None for all: random in training, fixed in eval."""
        tuples = cast(TRM, self.trm[cardinality_index]).tuples
        total = tuples.shape[0]
        keep = max(1, round(self.tuple_keep * total))
        if keep >= total:
            return None
        device = tuples.device
        if self.training:
            return torch.randperm(total, device=device)[:keep].sort().values
        # Evenly spaced, deterministic: floor(i * (T-1) / (keep-1)) are distinct because the step is >= 1.
        return torch.linspace(0, total - 1, keep, device=device).floor().long()

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std per channel with the training split's statistics, in the heads' dtype: what
        PLE (or the first block) receives."""
        x = x.to(self.feature_mean.dtype)
        scale = self.feature_std.reciprocal()
        return torch.addcmul(-self.feature_mean * scale, x, scale)  # in one pass

    def encode(self, x: torch.Tensor, intermediates: bool = False) -> VideoEmbedding:
        """Patch features x [..., L, P, D] (any float dtype) -> per-video embedding with leading dims x.shape[:-3].

        With Jnt-ST (`joint`) the enriched patches are the joint block's (returned as ple_patches) and E = H.
        """
        if x.dim() < 4 or tuple(x.shape[-3:]) != (self.frames, self.patches, self.dim):
            raise ValueError(
                f"expected patch features [..., {self.frames}, {self.patches}, {self.dim}] (L, P, D), "
                f"got {tuple(x.shape)}"
            )
        lead = x.shape[:-3]
        x = self.standardize(x.reshape(-1, self.frames, self.patches, self.dim))
        n = x.shape[0]
        patches = x if self.ple is None else self.ple(x.reshape(n * self.frames, self.patches, self.dim))
        patches = patches.reshape(n, self.frames, self.patches, self.dim)
        if self.joint is not None:
            patches = self.joint(patches)
        h = patches.mean(dim=2)
        e = h if self.fle is None else self.fle(h)
        trm_k, trm_k_rstd, trm_v, qc, qc_norms, tuples = [], [], [], [], [], []
        for i, trm in enumerate(cast("Sequence[TRM]", self.trm)):
            keep = self.kept_tuples(i)
            k, rstd, v = trm(e, keep)
            trm_k.append(k)
            trm_k_rstd.append(rstd)
            trm_v.append(v)
            tuples.append(trm.tuples if keep is None else trm.tuples[keep])
            if self.qc is not None:
                z, norms = self.qc[i](h, keep)
                qc.append(z)
                qc_norms.append(norms)
        emb = VideoEmbedding(tuple(trm_k), tuple(trm_k_rstd), tuple(trm_v), tuple(qc), tuple(qc_norms), tuple(tuples))
        if intermediates:
            enriched = self.ple is not None or self.joint is not None
            emb = replace(emb, ple_patches=patches if enriched else None, H=h, E=e)
        return emb._map(lambda t: _unflatten(t, lead))

    def relate(
        self,
        support: VideoEmbedding,
        support_labels: torch.Tensor,
        query: VideoEmbedding,
        way: int | None = None,
        *,
        max_elements: int = 1 << 24,
        qc_nearest: Sequence[torch.Tensor] | None = None,
    ) -> HeadsOutput:
        """Logits of query videos against the classes of the support set.

        support [n_s, ..] with labels [n_s] and query [n_q, ..] -> logits [n_q, way]; or a task batch:
        support [B, n_s, ..], labels [B, n_s], query [B, n_q, ..] -> [B, n_q, way]. Labels may come in
        any order (grouped here), each class at least once, with any counts per class and per task
        (uneven shots take a padded, masked layout; `group_by_class`); `way` defaults to max label + 1.
        Tasks are processed in chunks so the prototypes (B x way x n_q x T x D' floats) stay under
        `max_elements`.
        `qc_nearest` (per cardinality, [B, n_q, n_s, T_q] or [n_q, n_s, T_q], support in the labels'
        order): each query tuple's squared distance to the nearest tuple of each support video; QC then
        reads it instead of the embeddings' qc tuples (evaluation's table, `qc.nearest_block`).
        """
        if qc_nearest is not None and self.qc is None:
            raise ValueError(f"qc_nearest was given, but the {self.variant!r} heads have no QC")
        batched = support_labels.dim() == 2
        if not batched:
            support, query, support_labels = support[None], query[None], support_labels[None]
            qc_nearest = None if qc_nearest is None else [t[None] for t in qc_nearest]
        groups = group_by_class(support_labels, way)
        order, way, shot, shot_mask = groups.order, groups.way, groups.shot, groups.shot_mask
        batch, n_s = support_labels.shape
        if support.trm_k[0].shape[:2] != (batch, n_s):
            raise ValueError(
                f"support embedding has leading dims {tuple(support.trm_k[0].shape[:2])}, labels {(batch, n_s)}"
            )
        n_q = query.trm_k[0].shape[1]
        per_task = max(way * n_q * len(t) * k.shape[-1] for k, t in zip(query.trm_k, query.tuples, strict=False))
        step = max(1, max_elements // max(per_task, 1))
        chunks = []
        for start in range(0, batch, step):
            part = support[start : start + step]
            nearest = None if qc_nearest is None else [t[start : start + step] for t in qc_nearest]
            mask = None if shot_mask is None else shot_mask[start : start + step]
            if order is not None:  # sort each task's support by label (padded if uneven), one chunk at a time
                rows = torch.arange(len(part), device=order.device)[:, None]
                part = part[rows, order[start : start + step]]
                if nearest is not None:
                    by_label = order[start : start + step, None, :, None]
                    nearest = [torch.take_along_dim(t, by_label, dim=2) for t in nearest]
            chunks.append(self._relate_grouped(part, query[start : start + step], way, shot, nearest, mask))
        joined = [None if c[0] is None else torch.cat(cast(list, c)) for c in zip(*chunks, strict=True)]
        if not batched:
            joined = [None if t is None else t[0] for t in joined]
        return HeadsOutput(*cast(list, joined))

    def _relate_grouped(
        self,
        support: VideoEmbedding,
        query: VideoEmbedding,
        way: int,
        shot: int,
        qc_nearest: Sequence[torch.Tensor] | None = None,
        shot_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, ...]:
        """support sorted by class [B, way*shot, ..], query [B, n_q, ..] (and qc_nearest, support sorted
        alike) -> HeadsOutput's fields: logits, TRM and QC (or None) logits [B, n_q, way], the open-set
        head's known score and accept logit [B, n_q] (or None). Uneven shots: each class padded to
        `shot`, shot_mask [B, way, shot] False on the padding (None: equal shots, no masking)."""

        def by_class(t: torch.Tensor) -> torch.Tensor:  # [B, way*shot, ...] -> [B, way, shot, ...]
            return t.reshape(t.shape[0], way, shot, *t.shape[2:])

        head = self.open_set
        residual = head is not None and head.method == "disc"
        related = [
            relate_trm(
                module,
                query.trm_k[i],
                query.trm_k_rstd[i],
                query.trm_v[i],
                query.tuples[i],
                by_class(support.trm_k[i]),
                by_class(support.trm_k_rstd[i]),
                by_class(support.trm_v[i]),
                support.tuples[i],
                shot_mask,
                residual,
            )
            for i, module in enumerate(cast("Sequence[TRM]", self.trm))
        ]
        trm = _mean([cast(tuple, r)[0] if residual else cast(torch.Tensor, r) for r in related])
        qc: torch.Tensor | None = None
        if self.qc is not None and qc_nearest is not None:
            qc = _mean([relate_qc_nearest(t.unflatten(2, (way, shot)), shot_mask) for t in qc_nearest])
        elif self.qc is not None:
            qc = _mean(
                [
                    relate_qc(qz, qn, by_class(sz).flatten(2, 3), by_class(sn).flatten(2), shot_mask)
                    for qz, qn, sz, sn in zip(query.qc, query.qc_norms, support.qc, support.qc_norms, strict=False)
                ]
            )
        logits = trm if qc is None else trm + self.lambda_qc * qc
        if head is None or head.method == "bounded":
            return logits, trm, qc, None, None
        predicted = logits.argmax(-1)
        accept = None
        if residual:
            residuals = [cast("tuple[torch.Tensor, torch.Tensor]", r)[1] for r in related]
            accept = head.disc_logit(torch.cat(residuals, dim=3), predicted)
        return logits, trm, qc, head.known_score(logits, accept), accept

    def forward(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor) -> HeadsOutput:
        """support [n_s, L, P, D], labels [n_s] (0..way-1, any order), query [n_q, L, P, D] -> logits [n_q, way]."""
        return self.relate(self.encode(support), support_labels, self.encode(query))

    def loss(
        self, output: HeadsOutput, query_labels: torch.Tensor, reduction: str = "sum", open_set_weight: float = 1.0
    ) -> torch.Tensor:
        """L_TM + lambda * L_QC, cross-entropy over the queries: summed as released (STRM_SPEC section 7), or
        their mean. With lambda 0 the QC term is left out, so QC's weights get no gradient (not a zero one).
        Heads with an open-set head: `openset.open_set_loss` (bounded logits, unknown queries labelled -1)."""
        if self.open_set is not None:
            return open_set_loss(
                self.open_set,
                output.trm_logits,
                output.qc_logits,
                output.logits,
                output.accept_logit,
                query_labels,
                lambda_qc=self.lambda_qc,
                weight=open_set_weight,
                reduction=reduction,
            )
        flat = query_labels.reshape(-1)
        way = output.trm_logits.shape[-1]
        loss = F.cross_entropy(output.trm_logits.reshape(-1, way).float(), flat, reduction=reduction)
        if output.qc_logits is not None and self.lambda_qc:
            qc = F.cross_entropy(output.qc_logits.reshape(-1, way).float(), flat, reduction=reduction)
            loss = loss + self.lambda_qc * qc
        return loss

    def trm_attention(
        self,
        support: VideoEmbedding,
        support_labels: torch.Tensor,
        query: VideoEmbedding,
        cardinality: int | None = None,
    ) -> torch.Tensor:
        """TRM attention of each query tuple over a class's support tuples, for one task:
        [n_q, way, T_q, shot, T_s]; shot s of a class is its s-th support video in the labels' order, and
        tuple t's frames are `support.tuples[i][t]` (i the cardinality's index). Uneven shots: `shot` is
        the largest count and a smaller class's padded shots have weight 0."""
        i = self.cardinalities.index(cardinality if cardinality is not None else self.cardinalities[0])
        groups = group_by_class(support_labels[None], None)
        way, shot = groups.way, groups.shot
        trm = cast(TRM, self.trm[i])
        class_k = trm.keys(support.trm_k[i], support.tuples[i])
        class_k = class_k if groups.order is None else class_k[groups.order[0]]
        t_s = class_k.shape[1]
        weights = trm_attention_weights(
            trm.keys(query.trm_k[i], query.tuples[i]),
            class_k.reshape(way, shot * t_s, -1),
            None if groups.shot_mask is None else groups.shot_mask[0],
        )
        return weights.reshape(*weights.shape[:3], shot, t_s)


def build_heads(variant: str = "strm", dim: int = 2048, **options) -> STRMHeads:
    """The heads of a named variant for D-channel patch features.

    Options (defaults in DEFAULT_OPTIONS and VARIANTS): frames L, patches P, ple/fle in
    ("attention", "mixer", None) for the Table 4 swaps, cardinalities (any set), qc (on/off),
    trm_dim D' (1152), psi_dim and qc_dim (D/2), lambda_qc (0.1), scaled_attention (paper's
    1/sqrt(D) in the self-attention enrichment; released code: off), gamma_zero (attention branch
    removed, the "gamma forced to 0" ablation; also in the joint block), joint (Jnt-ST layers in place
    of PLE and FLE, None for none), tuple_keep (fraction of tuples kept), dropout (0.1).
    """
    return STRMHeads(variant, dim, **options)
