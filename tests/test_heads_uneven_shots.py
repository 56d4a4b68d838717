"""Support sets with uneven numbers of videos per class (the padded, masked layout of `group_by_class`)
against the loop reference, batched against per task, the QC table path, the label errors, and the
equal-shot path left untouched."""

from __future__ import annotations

import pytest
import torch
from small_heads import (
    DIM,
    FRAMES,
    PATCHES,
    TOL,
    assert_gradients_match_reference,
    assert_matches_reference,
    make_heads,
)

import pipeline.heads.qc as qc_module
import pipeline.heads.trm as trm_module
from pipeline.evaluation.batched import ProtoBaseline
from pipeline.heads import VARIANTS
from pipeline.heads.embedding import group_by_class
from pipeline.heads.qc import nearest_block
from pipeline.heads.reference import reference_forward


def shuffled_labels(shots: list[int], g: torch.Generator) -> torch.Tensor:
    labels = torch.repeat_interleave(torch.arange(len(shots)), torch.tensor(shots))
    return labels[torch.randperm(len(labels), generator=g)]


def uneven_task(shots: list[int], queries: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    support = torch.randn(sum(shots), FRAMES, PATCHES, DIM, generator=g)
    query = torch.randn(queries, FRAMES, PATCHES, DIM, generator=g)
    return support, shuffled_labels(shots, g), query


def test_group_by_class_pads_with_video_0_and_masks_the_padding():
    groups = group_by_class(torch.tensor([[2, 0, 1, 1, 0, 1]]), None)
    assert (groups.way, groups.shot) == (3, 3)
    assert groups.order.tolist() == [[1, 4, 0, 2, 3, 5, 0, 0, 0]]
    assert groups.shot_mask.tolist() == [[[True, True, False], [True, True, True], [True, False, False]]]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_with_uneven_shots(variant):
    assert_matches_reference(make_heads(variant), *uneven_task([1, 3, 2, 5], queries=3, seed=1))


@pytest.mark.parametrize(
    ("shots", "options"),
    [
        ([1, 3, 2, 5], {}),
        ([2, 1], {}),
        ([1, 1, 1, 4], {"cardinalities": (1, 2, 3)}),
        ([5, 1, 1, 1, 1], {"tuple_keep": 0.4}),
        ([1, 2, 3, 4, 5, 6, 7], {"qc_dim": 10}),
        ([3, 3, 1], {"ple": "mixer", "fle": "attention"}),
    ],
    ids=str,
)
def test_random_uneven_shapes(shots, options):
    heads = make_heads("strm", seed=len(shots), **options)
    assert_matches_reference(heads, *uneven_task(shots, queries=4, seed=sum(shots)))


@pytest.mark.parametrize("variant", ["strm", "trx"])
def test_gradients_match_reference_with_uneven_shots(variant):
    """Padded shots repeat a real video: any weight they kept would show in these gradients."""
    support, labels, query = uneven_task([1, 3, 2, 5], queries=4, seed=7)
    grads = assert_gradients_match_reference(variant, support, labels, query, torch.tensor([0, 1, 2, 3]))
    if variant == "strm":
        assert "qc.0.proj.weight" in grads


# Four tasks of 4 classes and 12 support videos, each with its own counts (one of them equal shots).
BATCH_SHOTS = [[1, 3, 3, 5], [3, 3, 3, 3], [6, 2, 1, 3], [2, 2, 2, 6]]


def pool_and_uneven_tasks(n_videos: int, queries: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_videos, FRAMES, PATCHES, DIM, generator=g)
    n_s = sum(BATCH_SHOTS[0])
    picks = torch.stack([torch.randperm(n_videos, generator=g)[: n_s + queries] for _ in BATCH_SHOTS])
    labels = torch.stack([shuffled_labels(shots, g) for shots in BATCH_SHOTS])
    return features, picks[:, :n_s], labels, picks[:, n_s:]


@pytest.mark.parametrize("variant", ["strm", "trx"])
def test_batched_uneven_tasks_with_their_own_counts_equal_per_task(variant):
    heads = make_heads(variant)
    features, support, labels, query = pool_and_uneven_tasks(40, queries=3, seed=5)
    with torch.no_grad():
        emb = heads.encode(features)
        batched = heads.relate(emb[support], labels, emb[query], 4)
        chunked = heads.relate(emb[support], labels, emb[query], 4, max_elements=1)  # one task a chunk
        for b in range(len(support)):
            one = heads.relate(emb[support[b]], labels[b], emb[query[b]], 4)
            ref = reference_forward(heads, features[support[b]], labels[b], features[query[b]])
            torch.testing.assert_close(batched.logits[b], one.logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(batched.logits[b], ref["logits"], **TOL)
    assert batched.logits.shape == (4, 3, 4)
    torch.testing.assert_close(chunked.logits, batched.logits)


def qc_table(emb) -> list[torch.Tensor]:
    """Per cardinality [N, N, T] like evaluate.qc_nearest_tables: nearest tuple of every video pair."""
    return [nearest_block(z, norms, z, norms)[0] for z, norms in zip(emb.qc, emb.qc_norms, strict=False)]


def test_qc_nearest_table_with_uneven_shots_equals_the_tuple_path():
    heads = make_heads("strm", cardinalities=(2, 3))
    features, support, labels, query = pool_and_uneven_tasks(30, queries=4, seed=6)
    with torch.no_grad():
        emb = heads.encode(features)
        nearest = [t[query[:, :, None], support[:, None, :]] for t in qc_table(emb)]  # [B, n_q, n_s, T]
        tuples = heads.relate(emb[support], labels, emb[query], 4)
        table = heads.relate(emb[support], labels, emb[query], 4, qc_nearest=nearest)
        one = heads.relate(emb[support[0]], labels[0], emb[query[0]], 4, qc_nearest=[t[0] for t in nearest])
    torch.testing.assert_close(table.qc_logits, tuples.qc_logits, **TOL)
    torch.testing.assert_close(table.logits, tuples.logits, **TOL)
    torch.testing.assert_close(one.qc_logits, tuples.qc_logits[0], **TOL)


@pytest.mark.parametrize(
    ("labels", "way", "message"),
    [
        ([[0, 0, 1, 3]], 4, "every class 0..3 at least once; task 0 lacks class 2"),
        ([[0, 1, 2, 3], [0, 1, 2, 2]], 4, "task 1 lacks class 3"),
        ([[0, 2, 2]], None, "task 0 lacks class 1"),
        ([[0, 1, 4]], 4, "class indices 0..3; task 0 has label 4"),
        ([[0, 1], [1, -2]], 2, "task 1 has label -2"),
    ],
)
def test_label_errors_name_the_task(labels, way, message):
    labels = torch.tensor(labels)
    with pytest.raises(ValueError, match=message):
        group_by_class(labels, way)
    heads = make_heads("trx")
    batch, n_s = labels.shape
    with torch.no_grad():
        emb = heads.encode(torch.randn(n_s + 1, FRAMES, PATCHES, DIM))
        support, query = torch.arange(n_s).expand(batch, n_s), torch.full((batch, 1), n_s)
        with pytest.raises(ValueError, match=message):
            heads.relate(emb[support], labels, emb[query], way)


def test_equal_shots_take_the_unmasked_path(monkeypatch):
    heads = make_heads("strm")
    g = torch.Generator().manual_seed(3)
    features = torch.randn(20, FRAMES, PATCHES, DIM, generator=g)
    equal = torch.stack([shuffled_labels([3, 3, 3], g) for _ in range(2)])
    uneven = torch.stack([shuffled_labels([1, 4, 4], g) for _ in range(2)])
    support, query = torch.arange(18).view(2, 9), torch.arange(18, 20).expand(2, 2)

    def refuse(*args, **kwargs):
        raise AssertionError("masked the padded shots of an equal-shot support set")

    assert group_by_class(equal, 3).shot_mask is None
    with torch.no_grad():
        emb = heads.encode(features)
        nearest = [t[query[:, :, None], support[:, None, :]] for t in qc_table(emb)]
        monkeypatch.setattr(trm_module, "mask_padded_shots", refuse)
        monkeypatch.setattr(qc_module, "mask_padded_shots", refuse)
        heads.relate(emb[support], equal, emb[query], 3)
        heads.relate(emb[support], equal, emb[query], 3, qc_nearest=nearest)
        heads.trm_attention(emb[support[0]], equal[0], emb[query[0]])
        for qc_nearest in (None, nearest):  # the patch is live: uneven shots do reach it
            with pytest.raises(AssertionError, match="masked"):
                heads.relate(emb[support], uneven, emb[query], 3, qc_nearest=qc_nearest)


def test_trm_attention_with_uneven_shots_rebuilds_the_trm_logits():
    heads = make_heads("trm")
    support, labels, query = uneven_task([1, 3, 2], queries=2, seed=4)
    with torch.no_grad():
        s, q = heads.encode(support), heads.encode(query)
        attention = heads.trm_attention(s, labels, q)  # [n_q, way, T, max shot, T]
        logits = heads.relate(s, labels, q).trm_logits
    assert attention.shape == (2, 3, 28, 3, 28)
    torch.testing.assert_close(attention.sum(dim=(-2, -1)), torch.ones(2, 3, 28))
    assert attention[:, 0, :, 1:].eq(0).all() and attention[:, 2, :, 2:].eq(0).all()  # padded shots
    support_v = trm_module.tuple_sum(s.trm_v[0], s.tuples[0])  # [n_s, T, D']
    query_v = trm_module.tuple_sum(q.trm_v[0], q.tuples[0])
    rebuilt = torch.empty(2, 3)
    for c in range(3):
        members = (labels == c).nonzero().flatten()  # shot order: the labels' order
        weights = attention[:, c, :, : len(members)].flatten(-2)  # [n_q, T, K_c*T]
        prototypes = weights @ support_v[members].flatten(0, 1)
        rebuilt[:, c] = -(query_v - prototypes).square().sum(dim=(-2, -1)) / 28
    torch.testing.assert_close(rebuilt, logits, rtol=1e-4, atol=1e-4)


def test_proto_baseline_averages_uneven_shots():
    baseline = ProtoBaseline()
    g = torch.Generator().manual_seed(8)
    features = torch.randn(16, FRAMES, PATCHES, DIM, generator=g)
    labels = torch.stack([shuffled_labels(shots, g) for shots in BATCH_SHOTS[:3]])
    support, query = torch.arange(36).remainder(12).view(3, 12), torch.arange(12, 16).expand(3, 4)
    emb = baseline.encode(features)
    batched = baseline.relate(emb[support], labels, emb[query], 4).logits
    for b in range(3):
        means = torch.stack([emb[support[b]][labels[b] == c].mean(0) for c in range(4)])
        expected = -((emb[query[b], None] - means[None]) ** 2).sum(-1)
        torch.testing.assert_close(batched[b], expected, rtol=1e-4, atol=1e-4)
        alone = baseline(features[support[b]], labels[b], features[query[b]]).logits
        torch.testing.assert_close(alone, expected, rtol=1e-4, atol=1e-4)
