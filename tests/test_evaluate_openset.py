"""The open-set protocol of `strm evaluate`: unknown queries in the same batches, each task's support
calibrated as predict calibrates it, every score measured against a per-task reference, saved episodes
with their unknown queries, a trained score used for `--unknown auto`, and the CLI's files and pairing."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
from test_evaluate import DIM, TRM_DIM, _split
from torch import nn
from typer.testing import CliRunner

from pipeline import evaluation as ev
from pipeline.data.episodes import UNKNOWN, TaskBatch
from pipeline.evaluation import batched, openset
from pipeline.evaluation import unknown as U
from pipeline.features.copies import write_random_cache
from pipeline.heads import build_heads, save_heads
from stages.app import app

COUNTS = [7, 9, 6, 8, 7, 6, 8, 7, 5]


@pytest.fixture(scope="module")
def split():
    return _split(counts=COUNTS, signal=0.6)


@pytest.fixture(scope="module")
def heads() -> nn.Module:
    torch.manual_seed(0)
    return build_heads("strm", dim=DIM, trm_dim=TRM_DIM).eval()


class WithKnownScore(nn.Module):
    """Heads with a stand-in trained open-set head: known_score = logsumexp of the logits (higher: known)."""

    def __init__(self, heads: nn.Module) -> None:
        super().__init__()
        self.heads = heads

    def encode(self, x):
        return self.heads.encode(x)

    def relate(self, support, labels, query, way=None, **options):
        out = self.heads.relate(support, labels, query, way, **options)
        return dataclasses.replace(out, known_score=out.logits.logsumexp(-1))


def _open_tasks(split, episodes=12, shot=3, m=3, q=2, seed=2) -> TaskBatch:
    return ev.sample_tasks(
        split.labels, episodes=episodes, way=4, shot=shot, queries=2, seed=seed, unknown_classes=m, unknown_queries=q
    )


def test_closed_set_digests_are_unchanged_and_open_set_digests_cover_the_unknowns(split):
    closed = ev.sample_tasks(split.labels, episodes=10, way=4, shot=3, queries=2, seed=2)
    opened = _open_tasks(split, episodes=10)
    assert "unknown_classes" not in ev.task_settings(closed)
    assert ev.task_settings(opened) == {**ev.task_settings(closed), "unknown_classes": 3, "unknown_queries": 2}
    for name in ("classes", "support", "query"):  # the known part is the closed-set task
        np.testing.assert_array_equal(getattr(opened, name), getattr(closed, name))
    digest = ev.episodes_digest(opened, split.video_ids)
    assert digest != ev.episodes_digest(closed, split.video_ids)
    ids, h = np.asarray(split.video_ids, dtype=object), hashlib.sha256()  # the closed-set rule, written out
    h.update(json.dumps({"way": 4, "shot": 3, "queries": 2, "episodes": 10}).encode())
    for row_s, row_q in zip(closed.support, closed.query, strict=True):
        h.update(("\x1f".join(ids[row_s]) + "\x1e" + "\x1f".join(ids[row_q]) + "\x1d").encode())
    assert ev.episodes_digest(closed, split.video_ids) == h.hexdigest()[:16]
    moved = np.array(opened.unknown_query)
    moved[4, 0] = moved[4, 1]
    assert ev.episodes_digest(dataclasses.replace(opened, unknown_query=moved), split.video_ids) != digest
    assert (opened.unknown_query_labels == UNKNOWN).all()


def test_saved_open_set_episodes_round_trip_and_wrong_videos_are_named(tmp_path, split):
    tasks = _open_tasks(split)
    path = ev.save_episodes(tmp_path / "e.json", tasks, split, seed=2, split_name="test")
    saved = json.loads(path.read_text())
    assert saved["unknown_classes"] == 3 and len(saved["tasks"][0]["unknown_query"]) == 3
    loaded, settings = ev.load_episodes(path, split)
    for name in TaskBatch.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(loaded, name), getattr(tasks, name), err_msg=name)
    assert settings["unknown_queries"] == 2 and ev.episodes_digest(loaded, split.video_ids) == saved["digest"]
    saved["tasks"][1]["unknown_query"][0][0] = saved["tasks"][1]["support"][0][0]  # a video of a known class
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"e\.json: task 1 holds a video that is not of class"):
        ev.load_episodes(path, split)


def _reference(model, split, tasks, trained="trained"):
    """Per task, as predict does it: calibrate on the support (unknown.calibrate), relate the known and unknown
    queries, score them; then every measure over the tasks (openset.open_set_metrics)."""
    embedding = ev.embed_split(model, split.features[:, 0])
    videos = tasks.open_queries()[0]
    n_known, way = tasks.query.shape[1], tasks.classes.shape[1]
    found, correct = {}, []
    for b in range(len(tasks)):
        support, labels = embedding[torch.as_tensor(tasks.support[b])], torch.as_tensor(tasks.support_labels[b])
        cal = U.calibrate(model, support, labels, way, trained=trained)
        logits, qc, known = U.relate_open(model, support, labels, embedding[torch.as_tensor(videos[b])], way)
        for name, v in U.scores(logits, qc, cal, known).items():
            found.setdefault(name, []).append((v, U.threshold(cal, name, 0.05)))
        correct.append(U.predicted(logits[:n_known]).numpy() == tasks.query_labels[b])
    out = {}
    for name, rows in found.items():
        values = np.stack([v for v, _ in rows])
        cuts = np.array([c for _, c in rows])
        out[name] = openset.open_set_metrics(
            values[:, :n_known], values[:, n_known:], np.stack(correct), threshold=cuts
        )
    return out


@pytest.mark.parametrize("qc_table", [False, True])
def test_every_score_is_measured_as_predict_would_score_each_task(split, heads, qc_table, monkeypatch):
    monkeypatch.setattr(batched, "qc_tables_pay", lambda *_: qc_table)
    tasks = _open_tasks(split)
    result = ev.evaluate(heads, split, tasks=tasks, batch_tasks=5)
    closed = ev.evaluate(heads, split, episodes=12, way=4, shot=3, queries=2, seed=2)
    np.testing.assert_array_equal(result.task_accuracy, closed.task_accuracy)  # the known queries alone
    reference = _reference(heads, split, tasks)
    assert (
        set(result.open_set)
        == set(reference)
        == {"max_logit", "margin", "probability", "zscore"}
        | {
            "qc",
            "zscore_qc",
            "zsum",
        }
    )
    for name, measures in reference.items():
        assert set(result.open_set[name]) == set(measures)
        for k, metric in measures.items():
            np.testing.assert_allclose(result.open_set[name][k], metric.per_task, atol=1e-6, err_msg=f"{name} {k}")
    assert result.open_set_info["auto"]["score"] == "zscore"
    assert result.open_set_info["auto"]["threshold_mean"] == pytest.approx(-1.6449, abs=1e-4)


def test_a_trained_score_is_measured_under_its_method_and_used_for_auto(split, heads):
    model = WithKnownScore(heads)
    tasks = _open_tasks(split, episodes=8)
    result = ev.evaluate(model, split, tasks=tasks, batch_tasks=3, trained="eos")
    reference = _reference(model, split, tasks, trained="eos")
    for k, metric in reference["eos"].items():
        np.testing.assert_allclose(result.open_set["eos"][k], metric.per_task, atol=1e-6, err_msg=k)
    assert result.open_set_info["auto"]["score"] == "eos"
    assert "eos" in "\n".join(result.open_set_lines())
    # predict's side: the one rule picks the trained score and its calibrated threshold
    embedding = ev.embed_split(model, split.features[:, 0])
    support, labels = embedding[torch.as_tensor(tasks.support[0])], torch.as_tensor(tasks.support_labels[0])
    cal = U.calibrate(model, support, labels, 4)
    assert cal.trained == "trained" and U.auto_score(cal) == "trained"
    assert U.auto_score(U.calibrate(heads, support, labels, 4)) == U.DEFAULT_SCORE
    logits, qc, known = U.relate_open(model, support, labels, embedding[torch.as_tensor(tasks.unknown_query[0])], 4)
    cut = U.threshold(cal, "trained", 0.05)
    decision = U.decide(logits, qc, cal, threshold=cut, known_score=known)
    np.testing.assert_array_equal(decision.known, known.double().numpy() >= cut)


def test_one_shot_tasks_measure_what_needs_no_held_out_clip(split, heads):
    result = ev.evaluate(heads, split, tasks=_open_tasks(split, episodes=6, shot=1))
    assert "auroc" in result.open_set["zscore"] and "catch_calibrated" not in result.open_set["zscore"]
    assert result.open_set_info["auto"]["threshold_mean"] is None


def test_cli_open_set_files_pairing_and_bad_input(tmp_path):
    cache = write_random_cache(tmp_path / "cache", splits={"test": (9, 6, 1)}, dim=DIM, seed=0, signal=0.5)
    torch.manual_seed(0)
    save_heads(tmp_path / "heads.pt", build_heads("strm", dim=DIM, trm_dim=TRM_DIM))
    runner = CliRunner()
    common = ["evaluate", "--cache", str(cache), "--episodes", "20", "--shot", "2", "--device", "cpu"]
    opened = ["--unknown-classes", "3", "--unknown-queries", "2"]
    out = runner.invoke(
        app,
        common
        + opened
        + ["--checkpoint", str(tmp_path / "heads.pt"), "--json", str(tmp_path / "a.json")]
        + ["--save-episodes", str(tmp_path / "ep.json")],
    )
    assert out.exit_code == 0, out.output
    assert "on the known queries" in out.output and "open set (3 unseen actions x 2 queries" in out.output
    assert "zscore" in out.output and "catch_oracle" in out.output
    block = ev.read_run(tmp_path / "a.json")["results"][0]["open_set"]
    assert block["auto"]["score"] == "zscore" and len(block["scores"]["margin"]["auroc"]["per_task"]) == 20
    table = pd.read_csv(tmp_path / "a.csv").set_index("scope")
    assert table.loc["open set: probability", "auroc"] == pytest.approx(
        block["scores"]["probability"]["auroc"]["mean"], abs=1e-4
    )
    out = runner.invoke(
        app,
        common[:3]
        + ["--device", "cpu", "--baseline", "proto", "--episodes-file", str(tmp_path / "ep.json")]
        + ["--json", str(tmp_path / "b.json")],
    )
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert out.exit_code == 0, out.output
    assert "open set, zscore: auroc" in out.output and "±" in out.output
    out = runner.invoke(app, common + ["--baseline", "proto", "--json", str(tmp_path / "c.json")])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["compare", str(tmp_path / "a.json"), str(tmp_path / "c.json")])
    assert out.exit_code == 1 and "unknown_classes is 3 in A and None in B" in out.output
    assert len(out.output.strip().splitlines()) == 1

    out = runner.invoke(app, common + ["--baseline", "proto", "--unknown-classes", "6", "--unknown-queries", "2"])
    assert out.exit_code == 2 and "--unknown-classes 6" in out.output and "at most 4" in out.output
    assert len(out.output.strip().splitlines()) == 1
    out = runner.invoke(app, common + ["--baseline", "proto", "--unknown-classes", "2"])
    assert out.exit_code == 2 and "--unknown-queries >= 1" in out.output
