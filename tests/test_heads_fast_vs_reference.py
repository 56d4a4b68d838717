"""The fast heads against the loop-structured reference (pipeline/heads/reference.py) on random shapes,
and the batched task path against one task at a time."""

from __future__ import annotations

import copy

import pytest
import torch
from small_heads import (
    DIM,
    FRAMES,
    PATCHES,
    assert_gradients_match_reference,
    assert_matches_reference,
    make_heads,
    random_task,
)

import pipeline.heads.trm as trm_module
from pipeline.heads import VARIANTS, VideoEmbedding
from pipeline.heads.reference import reference_forward


@pytest.mark.parametrize(
    ("way", "shot", "queries"), [(1, 1, 1), (5, 5, 2), (10, 10, 1), (3, 7, 3), (10, 1, 2), (1, 10, 4), (7, 2, 1)]
)
def test_strm_random_shapes(way, shot, queries):
    heads = make_heads("strm", seed=way * 100 + shot)
    assert_matches_reference(heads, *random_task(way, shot, queries, seed=way + shot))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant(variant):
    assert_matches_reference(make_heads(variant), *random_task(4, 3, 2, seed=1))


@pytest.mark.parametrize(
    "options",
    [
        {"ple": "mixer", "fle": "attention"},  # Table 4 swaps
        {"ple": "attention", "fle": "attention"},
        {"ple": "mixer", "fle": "mixer"},
        {"cardinalities": (1,)},
        {"cardinalities": (4,)},
        {"cardinalities": (1, 2, 3)},
        {"tuple_keep": 0.4},
        {"scaled_attention": True},
        {"gamma_zero": True},
        {"qc": False},
        {"lambda_qc": 0.5, "psi_dim": 6, "qc_dim": 10},
    ],
    ids=str,
)
def test_options(options):
    assert_matches_reference(make_heads("strm", **options), *random_task(3, 4, 2, seed=2))


def test_trm_variant_with_qc():
    assert_matches_reference(make_heads("trm", qc=True), *random_task(5, 2, 1, seed=3))


def test_with_feature_standardisation():
    heads = make_heads("strm")
    heads.set_feature_stats(torch.linspace(-1, 1, DIM), torch.linspace(0.5, 2, DIM))
    assert_matches_reference(heads, *random_task(4, 2, 2, seed=4))


def test_gradients_match_reference():
    """The fast relate works in place on its temporaries; autograd must still give the oracle's gradients."""
    support, labels, query = random_task(3, 2, 2, seed=7)
    assert_gradients_match_reference("strm", support, labels, query, torch.arange(3).repeat_interleave(2))


def test_trm_in_cpu_steps_equals_all_at_once(monkeypatch):
    heads = make_heads("trx")
    features, support, labels, query = _pool_and_tasks(30, batch=5, way=3, shot=2, queries=2, seed=8)
    with torch.no_grad():
        emb = heads.encode(features)
        whole = heads.relate(emb[support], labels, emb[query], 3).trm_logits
        monkeypatch.setattr(trm_module, "CPU_STEP_ELEMENTS", 2 * 3 * 6 * 28 * 12)  # two tasks a step for pairs
        stepped = heads.relate(emb[support], labels, emb[query], 3).trm_logits
    torch.testing.assert_close(stepped, whole, rtol=1e-6, atol=1e-6)


def test_trm_when_query_and_support_keep_different_tuples():
    """Random retention in training gives the query and the support their own tuple subsets: relate
    must take each side's tuples (checked against the tuple-level attention written out)."""
    kept = make_heads("trm", tuple_keep=0.5)
    full = make_heads("trm", tuple_keep=1.0)
    full.load_state_dict(kept.state_dict())
    support, labels, query = random_task(3, 2, 2, seed=9)
    order = torch.argsort(labels, stable=True)
    with torch.no_grad():
        s, q = kept.encode(support[order]), full.encode(query)
        logits = kept.relate(s, labels[order], q).trm_logits
        trm = kept.trm[0]
        assert len(s.tuples[0]) == 14 and len(q.tuples[0]) == 28
        class_k = trm.keys(s.trm_k[0], s.tuples[0]).reshape(3, 2 * 14, -1)
        class_v = trm_module.tuple_sum(s.trm_v[0], s.tuples[0]).reshape(3, 2 * 14, -1)
        query_k, query_v = trm.keys(q.trm_k[0], q.tuples[0]), trm_module.tuple_sum(q.trm_v[0], q.tuples[0])
        attention = torch.einsum("qtd,cjd->qctj", query_k, class_k).div(12**0.5).softmax(-1)
        prototypes = torch.einsum("qctj,cjd->qctd", attention, class_v)
        expected = -((query_v[:, None] - prototypes) ** 2).sum(dim=(-2, -1)) / 28
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


def test_keys_with_a_large_mean_against_float64():
    """Key projections far from zero mean (a shifted bias) and a non-unit LayerNorm: the key algebra
    must not subtract large means across a product (centred rows), checked against the reference
    run in float64."""
    heads = make_heads("strm", seed=11)
    with torch.no_grad():
        heads.trm[0].k_linear.bias.add_(30.0)
        heads.trm[0].norm_k.weight.mul_(3.0)
        heads.trm[0].norm_k.bias.add_(0.5)
    support, labels, query = random_task(5, 3, 2, seed=12)
    with torch.no_grad():
        fast = heads(support, labels, query).trm_logits.double()
        ref = reference_forward(copy.deepcopy(heads).double(), support.double(), labels, query.double())
    torch.testing.assert_close(fast, ref["trm_logits"], rtol=1e-5, atol=1e-6)


def _pool_and_tasks(n_videos: int, batch: int, way: int, shot: int, queries: int, seed: int):
    """Videos 0..n-1, each task draws way*(shot+queries) distinct ones; support labels shuffled."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_videos, FRAMES, PATCHES, DIM, generator=g)
    picks = torch.stack([torch.randperm(n_videos, generator=g)[: way * (shot + queries)] for _ in range(batch)])
    support, query = picks[:, : way * shot], picks[:, way * shot :]
    labels = torch.stack(
        [torch.arange(way).repeat_interleave(shot)[torch.randperm(way * shot, generator=g)] for _ in range(batch)]
    )
    return features, support, labels, query


@pytest.mark.parametrize("variant", ["strm", "trx"])
def test_batched_relate_equals_per_task(variant):
    heads = make_heads(variant)
    features, support, labels, query = _pool_and_tasks(40, batch=6, way=4, shot=3, queries=2, seed=5)
    with torch.no_grad():
        emb = heads.encode(features)
        batched = heads.relate(emb[support], labels, emb[query], 4)
        chunked = heads.relate(emb[support], labels, emb[query], 4, max_elements=1)  # one task a chunk
        for b in range(len(support)):
            one = heads.relate(emb[support[b]], labels[b], emb[query[b]], 4)
            naive = heads(features[support[b]], labels[b], features[query[b]])
            torch.testing.assert_close(batched.logits[b], one.logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(batched.logits[b], naive.logits, rtol=1e-5, atol=1e-5)
    assert batched.logits.shape == (6, 8, 4)
    torch.testing.assert_close(chunked.logits, batched.logits)
    if heads.has_qc:
        torch.testing.assert_close(chunked.qc_logits, batched.qc_logits)


def test_label_order_does_not_matter():
    heads = make_heads("strm")
    support, labels, query = random_task(4, 3, 1, seed=6)
    order = torch.argsort(labels, stable=True)
    with torch.no_grad():
        shuffled = heads(support, labels, query).logits
        grouped = heads(support[order], labels[order], query).logits
    torch.testing.assert_close(shuffled, grouped, rtol=1e-5, atol=1e-5)


def test_video_embedding_indexing_and_cat():
    heads = make_heads("strm")
    features = torch.randn(7, FRAMES, PATCHES, DIM)
    with torch.no_grad():
        emb = heads.encode(features, intermediates=True)
        parts = VideoEmbedding.cat(
            [heads.encode(features[:3], intermediates=True), heads.encode(features[3:], intermediates=True)]
        )
    idx = torch.tensor([[0, 6, 2], [1, 1, 5]])
    picked = emb[idx]
    assert len(emb) == 7 and picked.trm_k[0].shape[:2] == (2, 3) and picked.H.shape == (2, 3, FRAMES, DIM)
    torch.testing.assert_close(picked.qc[0][1, 2], emb.qc[0][5])
    torch.testing.assert_close(parts.trm_v[0], emb.trm_v[0])
    torch.testing.assert_close(parts.ple_patches, emb.ple_patches)
    assert torch.equal(picked.tuples[0], emb.tuples[0])
    for index in (
        idx,
        torch.tensor([-1, 0, -7], dtype=torch.int32),
        torch.tensor(4),
        torch.tensor([True] * 3 + [False] * 4),
    ):
        got = emb[index]
        for name in ("trm_k", "trm_k_rstd", "trm_v", "qc"):
            assert torch.equal(getattr(got, name)[0], getattr(emb, name)[0][index])
        assert torch.equal(got.H, emb.H[index])
    with pytest.raises(IndexError):
        emb[torch.tensor([7])]


def test_encode_leading_dims_and_half_input():
    heads = make_heads("strm")
    features = torch.randn(2, 3, FRAMES, PATCHES, DIM).half()
    with torch.no_grad():
        nested = heads.encode(features)
        flat = heads.encode(features.reshape(6, FRAMES, PATCHES, DIM))
    assert nested.trm_k[0].shape == (2, 3, 2, FRAMES, 12) and nested.trm_k_rstd[0].shape == (2, 3, 28)
    torch.testing.assert_close(nested.trm_k[0].reshape(6, 2, FRAMES, 12), flat.trm_k[0])
