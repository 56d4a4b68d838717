"""The --unknown rule keeps its promise: out-of-sample calibration, spreads that cannot collapse, a temperature
scaled to the logits, leave-one-out in chunks, and one decision rule with ties broken one way."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.evaluation import unknown as U
from pipeline.evaluation.batched import ProtoBaseline
from pipeline.heads import build_heads


class Lookup(torch.nn.Module):
    """A stand-in model: a clip's embedding row is (own logit, action, tag); its logit for its own action is
    the first value, `gap` below it for every other action. The tag only makes rows of equal value distinct."""

    def __init__(self, gap: float = 10.0) -> None:
        super().__init__()
        self.gap = gap

    def relate(self, support, labels, query, way):
        own = query[..., 0:1]
        out = (own - self.gap).expand(*query.shape[:-1], way).clone()
        out.scatter_(-1, query[..., 1:2].long(), own)
        return SimpleNamespace(logits=out, qc_logits=None)


def _clips(values, labels) -> torch.Tensor:
    values, labels = np.asarray(values, dtype=np.float64), np.asarray(labels)
    return torch.tensor(np.stack([values, labels, np.arange(len(values))], 1))


def _gaussian_support(rng, clips: int, way: int = 5, sd: float = 4.0):
    mean = rng.normal(-30, 5, way)
    labels = np.repeat(np.arange(way), clips)
    return mean, labels, _clips(rng.normal(mean[labels], sd), labels)


def _false_rejection(clips: int, draws: int, seed: int = 0) -> float:
    """The issue's simulation: Gaussian held-out logits, 5 actions; the share of new known clips rejected at 5%."""
    rng, model, rates = np.random.default_rng(seed), Lookup(), []
    for _ in range(draws):
        mean, labels, support = _gaussian_support(rng, clips)
        calibration = U.calibrate(model, support, torch.tensor(labels), 5)
        cut = U.threshold(calibration, "zscore", 0.05)
        truth = np.repeat(np.arange(5), 20)
        queries = _clips(rng.normal(mean[truth], 4.0), truth)
        z = U.scores(model.relate(None, None, queries, 5).logits, None, calibration)["zscore"]
        rates.append(float((z < cut).mean()))
    return float(np.mean(rates))


def test_two_clips_an_action_reject_what_is_asked():
    """In-sample z-scores of 2 clips are exactly +-1 and rejected 33% when 5% was asked; out of sample, 5%."""
    # 200 and 100 draws of 100 known queries: the rate's standard error is about 0.4 points
    assert 0.035 < _false_rejection(clips=2, draws=200) < 0.065
    assert 0.035 < _false_rejection(clips=5, draws=100, seed=1) < 0.065


def test_a_support_clip_is_scored_from_the_other_clips_only():
    """Two actions of two clips: clip 0's score uses clip 1 as its action's mean and action 1's spread alone."""
    values, labels = [-10.0, -12.0, -20.0, -23.0], [0, 0, 1, 1]
    calibration = U.calibrate(Lookup(gap=50), _clips(values, labels), torch.tensor(labels), 2)
    spread = math.sqrt((-20 + 23) ** 2 / 2)  # action 1 alone: one degree of freedom
    t = (-10 + 12) / (spread * math.sqrt(2))  # the other clip of action 0 is the mean; sqrt(1 + 1/1)
    expected = float(torch.special.ndtri(torch.tensor(0.5 + math.atan(t) / math.pi, dtype=torch.float64)))  # t(1)
    assert calibration.support_scores["zscore"][0] == pytest.approx(expected, rel=1e-9)
    # a query: all clips' statistics, pooled spread with 2 degrees of freedom, sqrt(1 + 1/2)
    pooled = math.sqrt(((-10 + 11) ** 2 * 2 + (-20 + 21.5) ** 2 * 2) / 2)
    t_query = (-14 + 11) / (pooled * math.sqrt(1.5))
    z = U.scores(torch.tensor([[-14.0, -64.0]]), None, calibration)["zscore"][0]
    cdf = 0.5 + t_query / (2 * math.sqrt(2 + t_query**2))  # Student's t with 2 degrees of freedom
    assert z == pytest.approx(float(torch.special.ndtri(torch.tensor(cdf, dtype=torch.float64))), rel=1e-9)
    assert U.threshold(calibration, "zscore", 0.05) == pytest.approx(-1.6448536, abs=1e-6)


def test_duplicated_clips_cannot_explode_a_zscore():
    rng = np.random.default_rng(3)
    _, labels, support = _gaussian_support(rng, clips=3, way=3)
    doubled = torch.cat([support, support[:1]])  # the same file twice: an identical embedding
    twice = U.calibrate(Lookup(), doubled, torch.tensor([*labels, labels[0]]), 3)
    once = U.calibrate(Lookup(), support, torch.tensor(labels), 3)
    assert twice.logit_mean == once.logit_mean and twice.logit_std == once.logit_std
    assert twice.support_scores == once.support_scores and any("exact copies" in n for n in twice.notes)
    # Every action's clips of one value (copies re-encoded, not bit-identical): no spread is left, the floor
    # holds it at a share of the logits' scale, and a query 5 units off gets a finite, moderate z-score.
    flat = _clips([-20.0, -20.0, -30.0, -30.0], [0, 0, 1, 1])
    calibration = U.calibrate(Lookup(), flat, torch.tensor([0, 0, 1, 1]), 2)
    assert min(calibration.logit_std) > 0
    z = U.scores(torch.tensor([[-25.0, -35.0], [-20.0, -30.0]]), None, calibration)["zscore"]
    assert np.isfinite(z).all() and -1e3 < z[0] < -3 and z[1] == pytest.approx(0.0, abs=1e-9)


def test_huge_logits_calibrate_like_small_ones():
    rng = np.random.default_rng(4)
    _, labels, support = _gaussian_support(rng, clips=4, way=3)
    small = U.calibrate(Lookup(gap=6.0), support, torch.tensor(labels), 3)
    big_support = support.clone()
    big_support[:, 0] *= 1e5
    huge = U.calibrate(Lookup(gap=6e5), big_support, torch.tensor(labels), 3)
    assert huge.temperature == pytest.approx(1e5 * small.temperature, rel=1e-3) and not huge.notes
    np.testing.assert_allclose(
        huge.support_scores["zscore"], small.support_scores["zscore"], atol=1e-5
    )  # float32 logits
    np.testing.assert_allclose(huge.support_scores["probability"], small.support_scores["probability"], rtol=1e-3)
    assert 0.5 < max(huge.support_scores["probability"]) < 0.9999  # not the 1.000000 of an unscaled search


def test_one_clip_an_action_holds_nothing_out():
    calibration = U.calibrate(Lookup(), _clips([-10.0, -20.0], [0, 1]), torch.tensor([0, 1]), 2)
    assert calibration.temperature == 1.0 and calibration.support_scores["zscore"] == []
    with pytest.raises(ValueError, match="every action needs 2 clips"):
        U.threshold(calibration, "zscore", 0.05)
    assert np.isfinite(U.scores(torch.tensor([[-12.0, -30.0]]), None, calibration)["zscore"]).all()


def test_a_temperature_at_its_bound_is_said():
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # held-out clips all wrong
    t, note = U.fit_temperature_noted(logits, torch.tensor([0, 1, 0, 1]))
    assert note is not None and "largest" in note and t > 100
    assert U.fit_temperature_noted(logits, torch.tensor([1, 0, 1, 0]))[1] is None  # all right: Laplace keeps T finite


def _embedded(n: int, way: int):
    torch.manual_seed(0)
    heads = build_heads("strm", dim=16, trm_dim=12).eval()
    labels = torch.arange(n) % way
    with torch.no_grad():
        embedding = heads.encode(torch.randn(n, 8, 16, 16) + labels[:, None, None, None].float())
    return heads, embedding, labels


def test_leave_one_out_in_chunks_equals_one_batch():
    heads, embedding, labels = _embedded(12, 3)
    whole = U.leave_one_out(heads, embedding, labels, 3, budget=10_000)
    chunked = U.leave_one_out(heads, embedding, labels, 3, budget=25)  # 2 held clips a relate
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_leave_one_out_memory_is_linear_in_the_support():
    """200 clips: every held clip needs the 199 others, 39,800 gathered clips in one batch before; in chunks
    at most LOO_BUDGET + n at a time. The largest gathered support tensor is measured, not assumed."""
    heads, embedding, labels = _embedded(200, 10)
    seen: list[int] = []
    relate = heads.relate

    def counting(support, support_labels, query, way):
        seen.append(support.trm_v[0].numel())
        return relate(support, support_labels, query, way)

    heads.relate = counting
    logits, _, truth = U.leave_one_out(heads, embedding, labels, 10)
    per_clip = embedding.trm_v[0][0].numel()
    assert len(truth) == 200 and logits.shape == (200, 10)
    assert max(seen) <= (U.LOO_BUDGET + 200) * per_clip  # linear in n
    assert max(seen) < 200 * 199 * per_clip / 8  # what one batch would gather
    assert U.predicted(logits).eq(truth).float().mean() > 0.5


def test_one_decision_rule_breaks_ties_to_the_lowest_action():
    logits = torch.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0], [-1.0, -5.0, -1.0]])
    assert U.predicted(logits).tolist() == [1, 0, 0]
    assert U.ranking(logits)[:, 0].tolist() == [1, 0, 0] and U.ranking(logits)[0].tolist() == [1, 2, 0]
    probs = (logits / 0.01).softmax(-1)
    assert U.ranking(probs)[:, 0].tolist() == U.predicted(logits).tolist()
    values, labels = [-1.0, -2.0, -1.5, -2.5, -1.2, -2.2], [0, 1, 2, 0, 1, 2]
    calibration = U.calibrate(Lookup(gap=3), _clips(values, labels), torch.tensor(labels), 3)
    decision = U.decide(logits, None, calibration, threshold=0.0)
    z = U.scores(logits, None, calibration)["zscore"]
    assert decision.action.tolist() == [1, 0, 0] and decision.logit.tolist() == [3.0, 2.0, -1.0]
    np.testing.assert_array_equal(decision.score, z)
    np.testing.assert_array_equal(decision.known, z >= 0.0)
    assert U.decide(logits).score is None and U.decide(logits).known.all()


def test_a_calibration_saved_before_keeps_its_rule():
    """Support indexes saved with the in-sample rule (no held_clips, dof, notes, version) load and score as before."""
    saved = {
        "temperature": 2.0,
        "logit_mean": [-10.0, -20.0],
        "logit_std": [2.0, 4.0],
        "qc_mean": None,
        "qc_std": None,
        "support_scores": {"zscore": [-1.0, 1.0, -1.0, 1.0]},
    }
    calibration = U.Calibration.from_dict(saved)
    z = U.scores(torch.tensor([[-14.0, -30.0], [-40.0, -16.0]]), None, calibration)["zscore"]
    np.testing.assert_allclose(z, [-2.0, 1.0])
    assert U.threshold(calibration, "zscore", 0.05) == pytest.approx(-1.0)
    assert U.Calibration.from_dict(calibration.to_dict()) == calibration


def test_unknown_protocol_measures_every_score():
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(8), 6)
    patterns = rng.normal(0, 1, (8, 12))
    embedding = torch.tensor(patterns[labels] + 0.3 * rng.normal(0, 1, (len(labels), 12)), dtype=torch.float32)
    result = U.unknown_protocol(ProtoBaseline(), embedding, labels, known=3, shots=3, unknown=3, draws=6)
    assert {"max_logit", "margin", "probability", "zscore"} <= set(result)
    assert result["zscore"]["auroc"] > 0.5 and 0 <= result["zscore"]["false_rejection_auto"] <= 1
