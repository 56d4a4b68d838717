"""Open-set training (issue #23): each method's loss moves what it should on a toy task, `none` leaves
the heads and their checkpoints as they were, a checkpoint carries its method and head through the
one loader, train-heads with a method resumes bit-identically after a kill, and bad input is one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import kill_at_random, kills_from_env, seed_from_env, timed_run
from small_heads import DIM, FRAMES, PATCHES, SMALL

from pipeline.evaluation import openset as measures
from pipeline.features.copies import write_random_cache
from pipeline.heads import STRMHeads, build_heads, load_heads, save_heads
from pipeline.heads.openset import UNKNOWN
from pipeline.studies.ablation import parse_grid
from pipeline.training.config import TrainError, check_open_set_heads, unknown_draws
from pipeline.training.runs import read_metrics
from pipeline.training.train import make_config

REPO = Path(__file__).resolve().parents[1]
CLI = "from stages.app import main; main()"
WAY, SHOT, KNOWN_Q, UNKNOWN_CLASSES, UNKNOWN_Q = 3, 3, 2, 3, 2

pytestmark = pytest.mark.usefixtures("one_thread")


def _toy_task(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Classes 0..2 known, 3..5 unknown: a fixed pattern per class plus fresh noise each step."""
    patterns = torch.randn(WAY + UNKNOWN_CLASSES, FRAMES, PATCHES, DIM, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1 + step)

    def videos(classes: torch.Tensor) -> torch.Tensor:
        return patterns[classes] + 0.5 * torch.randn(len(classes), FRAMES, PATCHES, DIM, generator=g)

    support_labels = torch.arange(WAY).repeat_interleave(SHOT)
    known = torch.arange(WAY).repeat_interleave(KNOWN_Q)
    outsiders = torch.arange(WAY, WAY + UNKNOWN_CLASSES).repeat_interleave(UNKNOWN_Q)
    query = torch.cat([videos(known), videos(outsiders)])
    labels = torch.cat([known, torch.full((len(outsiders),), UNKNOWN)])
    return videos(support_labels), support_labels, query, labels


def _trained(method: str, weight: float = 1.0, steps: int = 40) -> STRMHeads:
    torch.manual_seed(0)
    heads = build_heads("strm", DIM, **SMALL, open_set=method)
    optimizer = torch.optim.Adam(heads.parameters(), lr=3e-3)
    for step in range(steps):
        support, support_labels, query, labels = _toy_task(step)
        loss = heads.loss(heads(support, support_labels, query), labels, reduction="mean", open_set_weight=weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return heads.eval()


def _held_out(heads: STRMHeads):
    """The heads' output and labels on a toy task none of the training steps drew."""
    support, support_labels, query, labels = _toy_task(10_000)
    with torch.no_grad():
        return heads(support, support_labels, query), labels


def _auroc(score: torch.Tensor, labels: torch.Tensor) -> float:
    known = labels >= 0
    return float(measures.auroc(score[known].numpy(), score[~known].numpy())[0])


def test_eos_flattens_the_unknown_queries_softmax():
    def unknown_entropy(heads) -> float:
        out, labels = _held_out(heads)
        with torch.no_grad():
            p = heads.open_set.bounded(out.logits[labels == UNKNOWN]).softmax(-1)
        return float(-(p * p.log()).sum(-1).mean())

    flat, bounded_only = unknown_entropy(_trained("eos")), unknown_entropy(_trained("eos", weight=0.0))
    assert flat > bounded_only + 0.1, (flat, bounded_only)
    assert flat > 0.8 * np.log(WAY), flat  # near uniform


def test_the_garbage_class_absorbs_the_unknown_queries():
    before, labels = _held_out(build_heads("strm", DIM, **SMALL, open_set="garbage").eval())
    after, _ = _held_out(_trained("garbage"))
    unknown = labels == UNKNOWN
    garbage_before, garbage_after = 1 - before.known_score, 1 - after.known_score
    assert garbage_after[unknown].mean() > garbage_before[unknown].mean() + 0.2
    assert garbage_after[unknown].mean() > garbage_after[~unknown].mean() + 0.3


def test_the_discriminator_separates_known_from_unknown():
    method = "disc"
    torch.manual_seed(0)
    before, labels = _held_out(build_heads("strm", DIM, **SMALL, open_set=method).eval())
    after, _ = _held_out(_trained(method))
    assert after.known_score.shape == labels.shape and after.accept_logit is not None
    assert _auroc(after.known_score, labels) > 0.9, _auroc(after.known_score, labels)
    assert _auroc(after.known_score, labels) > _auroc(before.known_score, labels)


def test_bounded_trains_on_bounded_logits_alone():
    heads = _trained("bounded", steps=2)
    out, labels = _held_out(heads)
    assert out.known_score is None and out.accept_logit is None
    known, head = labels >= 0, heads.open_set
    assert head is not None and out.qc_logits is not None
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(head.bounded(out.trm_logits[known]), labels[known])
        expected = expected + heads.lambda_qc * torch.nn.functional.cross_entropy(
            head.bounded(out.qc_logits[known], 1), labels[known]
        )
        torch.testing.assert_close(heads.loss(out, labels, reduction="mean"), expected)
    assert "unknown_classes" not in unknown_draws(make_config(open_set="bounded"))
    assert unknown_draws(make_config(open_set="disc")) == {"unknown_classes": 5, "unknown_queries": 2}


def test_none_builds_the_closed_set_heads_unchanged():
    torch.manual_seed(0)
    plain = build_heads("strm", DIM, **SMALL)
    torch.manual_seed(0)
    none = build_heads("strm", DIM, **SMALL, open_set="none")
    assert none.options == plain.options and "open_set" not in none.options and none.open_set is None
    assert plain.state_dict().keys() == none.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, none.state_dict()[key]), key
    assert none(*_toy_task(0)[:3]).known_score is None
    assert make_config().open_set == "none"


@pytest.mark.parametrize("method", ["bounded", "eos", "garbage", "disc"])
def test_a_checkpoint_carries_its_method_and_head(tmp_path, method):
    heads = _trained(method, steps=2)
    save_heads(tmp_path / "h.pt", heads)
    loaded, _ = load_heads(tmp_path / "h.pt")
    assert loaded.open_set_method == method
    a, _ = _held_out(heads)
    b, _ = _held_out(loaded)
    assert torch.equal(a.logits, b.logits)
    assert (a.known_score is None) == (method == "bounded")
    if a.known_score is not None:
        assert b.known_score is not None and torch.equal(a.known_score, b.known_score)
    raw = torch.load(tmp_path / "h.pt", weights_only=True)
    raw["model"] = {k: v for k, v in raw["model"].items() if not k.startswith("open_set.")}
    with pytest.raises(ValueError, match=f"open_set '{method}'"):
        load_heads(raw)


def test_batched_relate_gives_each_task_its_own_known_score():
    heads = _trained("disc", steps=2)
    tasks = [_toy_task(100 + i) for i in range(3)]
    support, labels, query = (torch.stack([t[i] for t in tasks]) for i in range(3))
    with torch.no_grad():
        batched = heads.relate(heads.encode(support), labels, heads.encode(query))
        alone = heads.relate(heads.encode(support[1]), labels[1], heads.encode(query[1]))
    assert batched.known_score is not None and alone.known_score is not None
    torch.testing.assert_close(batched.known_score[1], alone.known_score, rtol=1e-5, atol=1e-6)


def test_an_open_set_method_on_heads_without_its_head_is_one_line():
    with pytest.raises(TrainError, match="--open-set disc: start.pt holds heads trained with open-set method 'none'"):
        check_open_set_heads("disc", "none", "start.pt")
    with pytest.raises(TrainError, match="--open-set eos needs unknown_classes"):
        make_config(open_set="eos", unknown_classes=0)
    with pytest.raises(TrainError, match="--open-set 'bogus'"):
        make_config(open_set="bogus")
    with pytest.raises(TrainError, match="open_set"):
        make_config(heads_options={"open_set": "disc"})


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", CLI, "train-heads", *args]


def test_train_heads_open_set_without_unknown_queries_is_one_line(tmp_path):
    cache = write_random_cache(tmp_path / "cache", splits={"train": (8, 4, 1)}, dim=32)
    done = subprocess.run(
        _cli(
            "--cache",
            str(cache),
            "--open-set",
            "garbage",
            "--unknown-queries",
            "0",
            "--val-every",
            "0",
            "--out",
            str(tmp_path / "r"),
        ),
        env=_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--open-set garbage" in lines[0], done.stderr


def _same_run(a: Path, b: Path) -> None:
    ca, cb = torch.load(a / "last.pt", weights_only=True), torch.load(b / "last.pt", weights_only=True)
    assert ca["task_index"] == cb["task_index"]
    assert any(k.startswith("open_set.") for k in ca["model"])
    for key, value in ca["model"].items():
        assert torch.equal(value, cb["model"][key]), key
    for index, state in ca["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, cb["optimizer"]["state"][index][name]), (index, name)
    strip = lambda records: [{k: v for k, v in r.items() if k != "tasks_per_s"} for r in records]  # noqa: E731
    assert strip(read_metrics(a)) == strip(read_metrics(b))


def test_open_set_training_resumes_bit_identically_after_a_kill(tmp_path):
    """SIGKILL at seeded random moments of a `--open-set disc` run, then `--resume`: the same weights,
    optimiser state and metrics as one uninterrupted run (tests/faults.py)."""
    cache = write_random_cache(tmp_path / "cache", splits={"train": (10, 5, 2), "val": (5, 3, 1)}, dim=32)
    args = ["--cache", str(cache), "--episodes", "40", "--shot", "2", "--queries", "2", "--val-every", "20"]
    args += ["--val-episodes", "10", "--checkpoint-every", "5", "--heads-option", "trm_dim=32", "--seed", "3"]
    args += ["--open-set", "disc", "--unknown-classes", "2", "--unknown-queries", "1"]
    duration = timed_run(_cli(*args, "--out", str(tmp_path / "whole")), env=_env(), cwd=REPO)
    campaign = kill_at_random(
        lambda trial: _cli(*args, "--out", str(tmp_path / f"killed{trial}"), "--resume"),
        lambda trial: _same_run(tmp_path / "whole", tmp_path / f"killed{trial}"),
        env=_env(),
        cwd=REPO,
        kills=kills_from_env(2),
        seed=seed_from_env(2),
        duration_s=duration,
    )
    assert campaign.final_returncode == 0, campaign.summary() + campaign.final_stderr
    assert campaign.matched == len(campaign.moments_s), campaign.summary()


def test_ablate_rows_name_their_open_set_method():
    plain, disc = parse_grid(["strm,strm+disc"])
    assert plain.open_set is None and "open_set" not in plain.describe()
    assert disc.open_set == "disc" and disc.label == "strm+disc" and disc.describe()["open_set"] == "disc"
    with pytest.raises(ValueError, match="unknown open-set method 'bogus'"):
        parse_grid(["strm+bogus"])
