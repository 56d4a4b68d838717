"""What the heads promise beyond matching the reference: sizes, determinism, the fixed defects,
standardisation, inspection hooks, label checks, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.heads import build_heads
from pipeline.heads.embedding import group_by_class
from pipeline.heads.trm import tuple_sum

DIM, FRAMES, PATCHES = 16, 8, 4
SMALL = {"frames": FRAMES, "patches": PATCHES, "trm_dim": 12}


def task(way=3, shot=2, queries=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    support = torch.randn(way * shot, FRAMES, PATCHES, DIM, generator=g)
    query = torch.randn(way * queries, FRAMES, PATCHES, DIM, generator=g)
    labels = torch.arange(way).repeat_interleave(shot)[torch.randperm(way * shot, generator=g)]
    return support, labels, query, torch.arange(way).repeat_interleave(queries)


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_at_d2048():
    """STRM_SPEC section 8, block by block and in total."""
    strm = build_heads("strm", 2048)
    assert n_params(strm) == 39_866_001
    assert n_params(strm.ple) == 17_836_033
    assert n_params(strm.fle) == 8_392_848
    assert n_params(strm.trm) == 9_441_792
    assert n_params(strm.qc) == 4_195_328
    trx = build_heads("trx", 2048)
    assert n_params(trx) == 23_602_176
    assert n_params(trx.trm[1]) == 14_160_384


def test_sizes_come_from_options():
    heads = build_heads("strm", 24, frames=5, patches=9, trm_dim=10)
    assert heads.fle.token_mlp[0].weight.shape == (5, 5)
    assert heads.trm[0].k_linear.weight.shape == (10, 48)
    assert heads.ple.psi[0].weight.shape == (12, 24) and heads.qc[0].proj.weight.shape == (12, 48)
    out = heads(torch.randn(4, 5, 9, 24), torch.tensor([1, 0, 1, 0]), torch.randn(3, 5, 9, 24))
    assert out.logits.shape == (3, 2)
    with pytest.raises(ValueError, match="expected patch features"):
        heads.encode(torch.randn(2, 8, 9, 24))


def test_unknown_variant_and_option():
    with pytest.raises(ValueError, match="unknown heads variant"):
        build_heads("strn", 16)
    with pytest.raises(TypeError, match="unknown heads option"):
        build_heads("strm", 16, lamda_qc=0.1)
    with pytest.raises(ValueError, match="ple must be one of"):
        build_heads("strm", 16, ple="conv")


def test_eval_is_deterministic_training_is_not():
    heads = build_heads("strm", DIM, **SMALL, tuple_keep=0.5)
    support, labels, query, _ = task()
    heads.eval()
    with torch.no_grad():
        first, second = heads(support, labels, query), heads(support, labels, query)
    assert torch.equal(first.logits, second.logits)
    heads.train()
    torch.manual_seed(0)
    with torch.no_grad():
        noisy = heads(support, labels, query)
    assert not torch.allclose(noisy.qc_logits, first.qc_logits)  # QC dropout is active in training only


def test_tuple_retention():
    heads = build_heads("strm", DIM, **SMALL, tuple_keep=0.5).eval()
    kept = heads.kept_tuples(0)
    assert len(kept) == 14 and len(set(kept.tolist())) == 14 and kept[0] == 0 and kept[-1] == 27
    emb = heads.encode(torch.randn(2, FRAMES, PATCHES, DIM))
    assert emb.trm_k_rstd[0].shape[1] == 14 and emb.qc[0].shape[1] == 14
    assert torch.equal(emb.tuples[0], heads.trm[0].tuples[kept])
    heads.train()
    torch.manual_seed(1)
    drawn = {tuple(heads.kept_tuples(0).tolist()) for _ in range(5)}
    assert len(drawn) > 1 and all(len(d) == 14 for d in drawn)
    assert build_heads("strm", DIM, **SMALL).kept_tuples(0) is None


def test_qc_is_registered_trained_and_saved():
    heads = build_heads("strm", DIM, **SMALL).train()
    assert "qc.0.proj.weight" in heads.state_dict()
    assert any(p is heads.qc[0].proj.weight for p in heads.parameters())
    support, labels, query, query_labels = task()
    out = heads(support, labels, query)
    heads.loss(out, query_labels).backward()
    assert heads.qc[0].proj.weight.grad.abs().sum() > 0
    assert heads.ple.gamma.grad is not None and heads.ple.gamma.grad.abs() > 0
    assert heads.trm[0].k_linear.weight.grad.abs().sum() > 0


def test_loss_is_summed_cross_entropy_with_lambda():
    heads = build_heads("strm", DIM, **SMALL, lambda_qc=0.25).eval()
    support, labels, query, query_labels = task()
    with torch.no_grad():
        out = heads(support, labels, query)
        loss = heads.loss(out, query_labels)
    trm = F.cross_entropy(out.trm_logits, query_labels, reduction="sum")
    qc = F.cross_entropy(out.qc_logits, query_labels, reduction="sum")
    torch.testing.assert_close(loss, trm + 0.25 * qc)
    torch.testing.assert_close(out.logits, out.trm_logits + 0.25 * out.qc_logits)


def test_gradients_finite_when_a_query_equals_a_support_video():
    """QC's distance is exactly 0 there; sqrt must not turn that into an inf/NaN gradient."""
    heads = build_heads("strm", DIM, **SMALL).eval()
    support, labels, _, _ = task()
    query = support[:2].clone()
    out = heads(support, labels, query)
    heads.loss(out, labels[:2]).backward()
    assert all(torch.isfinite(p.grad).all() for p in heads.parameters() if p.grad is not None)


def test_feature_stats_are_applied_and_kept_in_the_state_dict():
    heads = build_heads("strm", DIM, **SMALL).eval()
    plain = build_heads("strm", DIM, **SMALL).eval()
    plain.load_state_dict(heads.state_dict())
    mean, std = torch.randn(DIM), torch.rand(DIM) + 0.5
    std[3] = 0.0  # a channel that is constant on the training split: centred, not scaled
    heads.set_feature_stats(mean, std)
    assert heads.feature_std[3] == 1.0
    x = torch.randn(3, FRAMES, PATCHES, DIM)
    expected_std = torch.where(std > 0, std, torch.ones_like(std))
    with torch.no_grad():
        torch.testing.assert_close(heads.encode(x).trm_k[0], plain.encode((x - mean) / expected_std).trm_k[0])
    state = heads.state_dict()
    assert torch.equal(state["feature_mean"], mean) and torch.equal(state["feature_std"], expected_std)
    with pytest.raises(ValueError, match="feature stats must be"):
        heads.set_feature_stats(torch.zeros(3), torch.ones(3))


def test_feature_std_has_a_relative_floor():
    """Near-constant channels are not blown up: std is floored at 1e-2 x the median of the live channels."""
    heads = build_heads("strm", DIM, **SMALL)
    std = torch.full((DIM,), 2.0)
    std[0], std[1], std[2], std[3] = 3e-5, 0.01, 0.03, 0.0  # median of the channels above 1e-6: 2.0
    heads.set_feature_stats(torch.zeros(DIM), std)
    assert heads.feature_std[0] == pytest.approx(0.02) and heads.feature_std[1] == pytest.approx(0.02)
    assert heads.feature_std[2] == pytest.approx(0.03) and heads.feature_std[3] == 1.0
    assert torch.equal(heads.feature_std[4:], std[4:])
    heads.set_feature_stats(torch.zeros(DIM), torch.zeros(DIM))  # nothing varies: centring only
    assert torch.equal(heads.feature_std, torch.ones(DIM))


def test_intermediates_for_visualisation():
    heads = build_heads("strm", DIM, **SMALL).eval()
    x = torch.randn(3, FRAMES, PATCHES, DIM)
    with torch.no_grad():
        emb = heads.encode(x, intermediates=True)
    assert emb.ple_patches.shape == (3, FRAMES, PATCHES, DIM)
    torch.testing.assert_close(emb.H, emb.ple_patches.mean(dim=2))
    assert emb.E.shape == (3, FRAMES, DIM)
    assert heads.encode(x).H is None
    trx = build_heads("trx", DIM, **SMALL).eval().encode(x, intermediates=True)
    assert trx.ple_patches is None and torch.allclose(trx.H, x.mean(dim=2)) and torch.equal(trx.E, trx.H)


def test_trm_attention_weights_rebuild_the_trm_logits():
    heads = build_heads("strm", DIM, **SMALL).eval()
    support, labels, query, _ = task(way=3, shot=2, queries=1)
    with torch.no_grad():
        s, q = heads.encode(support), heads.encode(query)
        attention = heads.trm_attention(s, labels, q)  # [n_q, way, T, shot, T]
        logits = heads.relate(s, labels, q).trm_logits
    assert attention.shape == (3, 3, 28, 2, 28)
    torch.testing.assert_close(attention.sum(dim=(-2, -1)), torch.ones(3, 3, 28))
    order = torch.argsort(labels, stable=True)
    values = tuple_sum(s.trm_v[0], s.tuples[0])[order].reshape(3, 2 * 28, -1)  # [way, shot*T, D']
    prototypes = torch.einsum("qctj,cjd->qctd", attention.flatten(-2), values)
    rebuilt = -((tuple_sum(q.trm_v[0], q.tuples[0])[:, None] - prototypes) ** 2).sum(dim=(-2, -1)) / 28
    torch.testing.assert_close(rebuilt, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([0, -1, 1, 1], "class indices 0..1; task 0 has label -1"),
        ([0, 0, 2, 2, 2, 2], "task 0 lacks class 1"),  # uneven shots are fine (test_heads_uneven_shots.py)
        ([0, 1, 1, 1, 0, 0], None),  # fine: any order
    ],
)
def test_support_labels_are_checked(labels, message):
    labels = torch.tensor(labels)
    if message is None:
        groups = group_by_class(labels[None], None)
        assert (groups.way, groups.shot, groups.shot_mask) == (2, 3, None)
        assert labels[groups.order[0]].tolist() == [0, 0, 0, 1, 1, 1]
        assert group_by_class(labels.sort().values[None], None).order is None  # already grouped
    else:
        with pytest.raises(ValueError, match=message):
            group_by_class(labels[None], None)


def test_relate_rejects_float_labels_and_mismatched_batches():
    heads = build_heads("trx", DIM, **SMALL).eval()
    emb = heads.encode(torch.randn(4, FRAMES, PATCHES, DIM))
    with pytest.raises(ValueError, match="integer class indices"):
        heads.relate(emb, torch.tensor([0.0, 1.0, 0.0, 1.0]), emb)
    with pytest.raises(ValueError, match="leading dims"):
        heads.relate(emb[torch.tensor([[0, 1]])], torch.tensor([[0, 1, 0, 1]]), emb[torch.tensor([[2]])])
