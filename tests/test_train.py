"""Episodic training: it learns, it resumes after kill -9 to the same weights, its checkpoints load
with weights_only=True, it refuses caches and options that do not fit, and DDP on 2 CPU processes
computes the same gradients as one process accumulating the step's 16 tasks."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from collectives_probe import assert_collectives_on
from faults import kill_at_random, kills_from_env, seed_from_env, timed_run
from typer.testing import CliRunner

from pipeline.evaluation.batched import evaluate
from pipeline.features.cache import CacheWriter, SplitLayout, open_cache
from pipeline.features.copies import write_random_cache
from pipeline.heads import build_heads, load_heads
from pipeline.training.runs import read_metrics
from pipeline.training.train import TrainError, make_config, train

SMALL = {"trm_dim": 32}  # D' = 32 keeps a task at D = 32 in tens of milliseconds
CLI = "from stages.app import main; main()"
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", CLI, "train-heads", *args]


def _informative_cache(path: Path, *, train_classes: int = 40, signal: float = 1.0, informative: int = 4) -> Path:
    """Class patterns on the same few channels in every split, unit noise on all 32 channels.

    Unlike a cache whose class signal is spread over every channel, here something transfers from
    training classes to new ones (which channels matter), and untrained heads are near chance:
    validation accuracy can only rise by learning.
    """
    rng = np.random.default_rng(0)
    frames, patches, dim = 8, 16, 32
    splits = {"train": (train_classes, 4, 2), "val": (5, 6, 1)}
    layouts, data = {}, {}
    for split, (classes, per_class, views) in splits.items():
        labels = np.repeat(np.arange(classes), per_class)
        patterns = np.zeros((classes, frames, patches, dim), np.float32)
        patterns[..., :informative] = rng.standard_normal((classes, frames, patches, informative))
        noise = rng.standard_normal((len(labels), views, frames, patches, dim))
        data[split] = (signal * patterns[labels][:, None] + noise).astype(np.float16)
        layouts[split] = SplitLayout(
            [f"{split}/{i}" for i in range(len(labels))],
            labels.tolist(),
            [f"{split}_{c}" for c in range(classes)],
            views,
        )
    writer = CacheWriter.create(
        path, {"dataset": "informative", "signal": signal}, layouts, frames=frames, patches=patches, dim=dim
    )
    for split, features in data.items():
        for i, x in enumerate(features):
            writer.write(split, i, x)
    return path


def test_it_learns_and_checkpoints_load_weights_only(tmp_path):
    cache = _informative_cache(tmp_path / "cache")
    val = open_cache(cache).load_split("val")
    torch.manual_seed(0)
    untrained = evaluate(build_heads("strm", 32, **SMALL), val, episodes=100, way=5, shot=2, queries=1).mean

    config = make_config(
        "frozen",
        episodes=150,
        shot=2,
        queries=2,
        lr=3e-3,
        heads_options=SMALL,
        val_every=50,
        val_episodes=100,
        patience=0,
        log_every=25,
    )
    result = train(config, cache, tmp_path / "run")

    assert result.tasks_done == 150 and result.best_checkpoint == tmp_path / "run" / "best.pt"
    assert result.best_val_accuracy >= 50 and result.best_val_accuracy >= untrained + 15, (untrained, result)
    records = read_metrics(tmp_path / "run")
    assert [r["task"] for r in records if r["kind"] == "val"] == [50, 100, 150]
    assert {"config.json", "metrics.jsonl", "last.pt", "best.pt", "curve.png"} <= {
        p.name for p in (tmp_path / "run").iterdir()
    }

    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    for ckpt in (best, last):
        assert ckpt["format"] == "strm-heads/1"
        assert {"model", "optimizer", "scheduler", "rng", "task_index", "config", "cache_fingerprint"} <= set(ckpt)
    assert last["task_index"] == 150 and best["task_index"] == result.best_task
    assert best["cache_fingerprint"] == open_cache(cache).fingerprint
    heads, _ = load_heads(best)  # the standardisation travels inside the heads
    assert not torch.equal(heads.feature_std, torch.ones(32))
    again = evaluate(heads, val, episodes=100, way=5, shot=2, queries=1).mean
    assert again == pytest.approx(result.best_val_accuracy)
    info = json.loads((tmp_path / "run" / "config.json").read_text())
    assert info["config"]["lr"] == 3e-3 and info["cache"]["fingerprint"]["dataset"] == "informative"


def _same_run(a: Path, b: Path) -> None:
    """Two run folders hold the same training: weights, optimiser state, metrics (timing aside)."""
    ca, cb = torch.load(a / "last.pt", weights_only=True), torch.load(b / "last.pt", weights_only=True)
    assert ca["task_index"] == cb["task_index"]
    for key, value in ca["model"].items():
        assert torch.equal(value, cb["model"][key]), key
    for index, state in ca["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, cb["optimizer"]["state"][index][name]), (index, name)
    strip = lambda records: [{k: v for k, v in r.items() if k != "tasks_per_s"} for r in records]  # noqa: E731
    assert strip(read_metrics(a)) == strip(read_metrics(b))
    best_a, best_b = torch.load(a / "best.pt", weights_only=True), torch.load(b / "best.pt", weights_only=True)
    for key, value in best_a["model"].items():
        assert torch.equal(value, best_b["model"][key]), f"best.pt {key}"


def test_kills_at_random_moments_then_resume_end_with_the_uninterrupted_run(tmp_path):
    """SIGKILL at a seeded random moment, then `--resume`: each trial ends with the same weights,
    optimiser state, metrics and best.pt as one uninterrupted run. `make faults` lands 20 kills."""
    cache = write_random_cache(tmp_path / "cache", splits={"train": (6, 5, 2), "val": (5, 3, 1)}, dim=32)
    args = ["--cache", str(cache), "--episodes", "60", "--shot", "2", "--queries", "2", "--val-every", "20"]
    args += ["--val-episodes", "10", "--checkpoint-every", "5", "--heads-option", "trm_dim=32", "--seed", "3"]
    duration = timed_run(_cli(*args, "--out", str(tmp_path / "whole")), env=_env(), cwd=REPO)

    def command(trial: int) -> list[str]:
        return _cli(*args, "--out", str(tmp_path / f"killed{trial}"), "--resume")

    campaign = kill_at_random(
        command,
        lambda trial: _same_run(tmp_path / "whole", tmp_path / f"killed{trial}"),
        env=_env(),
        cwd=REPO,
        kills=kills_from_env(2),
        seed=seed_from_env(2),
        duration_s=duration,
    )
    assert campaign.final_returncode == 0, campaign.summary() + campaign.final_stderr
    assert campaign.landed == kills_from_env(2), campaign.summary()
    assert campaign.matched == len(campaign.moments_s), campaign.summary()  # every trial, landed or not
    print(f"train-heads faults: {campaign.summary()}, {duration:.1f} s uninterrupted")


def test_kill_9_then_resume_ends_with_the_uninterrupted_weights(tmp_path):
    cache = write_random_cache(tmp_path / "cache", splits={"train": (6, 5, 2), "val": (5, 3, 1)}, dim=32)
    args = [
        "--cache",
        str(cache),
        "--episodes",
        "80",
        "--shot",
        "2",
        "--queries",
        "2",
        "--val-every",
        "40",
        "--val-episodes",
        "20",
        "--checkpoint-every",
        "10",
        "--heads-option",
        "trm_dim=32",
        "--seed",
        "3",
    ]
    whole = subprocess.Popen(
        _cli(*args, "--out", str(tmp_path / "whole")), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    killed = subprocess.Popen(
        _cli(*args, "--out", str(tmp_path / "killed")), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    last = tmp_path / "killed" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    at_kill = torch.load(last, weights_only=True)["task_index"]
    assert 10 <= at_kill < 80
    with open(tmp_path / "killed" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "ta')  # as if the kill had landed mid-line

    resumed = subprocess.run(
        _cli(*args, "--out", str(tmp_path / "killed"), "--resume"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert whole.wait(timeout=300) == 0, whole.stderr.read().decode()

    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    assert a["task_index"] == b["task_index"] == 80
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), (index, name)
    strip = lambda records: [{k: v for k, v in r.items() if k != "tasks_per_s"} for r in records]  # noqa: E731
    assert strip(read_metrics(tmp_path / "whole")) == strip(read_metrics(tmp_path / "killed"))
    assert json.loads((tmp_path / "killed" / "config.json").read_text())["resumed_from_task"] == at_kill


def test_streaming_from_disk_trains_the_same_weights_as_ram(tmp_path):
    cache = write_random_cache(tmp_path / "cache", splits={"train": (6, 5, 3)}, dim=32)
    weights = []
    for loading in ("ram", "stream"):
        config = make_config(
            "frozen", episodes=12, shot=2, queries=2, heads_options=SMALL, val_every=0, loading=loading, read_ahead=3
        )
        result = train(config, cache, tmp_path / loading)
        weights.append(torch.load(tmp_path / loading / "last.pt", weights_only=True)["model"])
        written = json.loads((tmp_path / loading / "config.json").read_text())
        assert written["loading"] == loading  # the choice is on record, and in the stage's output
        assert written["notes"][0] == result.notes[0]
    assert result.notes[0] == "training split: streamed from disk (0.7 MB, 3 tasks read ahead)"
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


def test_caches_and_options_that_do_not_fit_are_clear_errors(tmp_path):
    from stages.app import app

    splits = {"train": (6, 5, 2), "val": (5, 3, 1)}
    cache = write_random_cache(tmp_path / "a", splits=splits, dim=32)
    other = write_random_cache(tmp_path / "b", splits=splits, dim=32, seed=1)
    wider = write_random_cache(tmp_path / "c", splits=splits, dim=48)  # same fingerprint, another D
    config = make_config("frozen", episodes=4, shot=2, queries=2, heads_options=SMALL, val_every=0, checkpoint_every=2)
    train(config, cache, tmp_path / "run")

    with pytest.raises(TrainError, match="trained on another cache.*seed"):
        train(config, other, tmp_path / "run", resume=True)
    with pytest.raises(TrainError, match="D=32.*D=48"):
        train(config, wider, tmp_path / "run", resume=True)
    with pytest.raises(TrainError, match="holds an earlier run.*--resume.*--overwrite"):
        train(config, cache, tmp_path / "run")
    longer = train(replace(config, episodes=6), cache, tmp_path / "run", resume=True)  # constant lr: may extend
    assert longer.tasks_done == 6 and read_metrics(tmp_path / "run")[-1]["task"] == 6

    with pytest.raises(
        TrainError, match=r"diverged.*no checkpoint was written yet; lower the learning rate \(now 1e\+06\)"
    ):
        train(
            make_config(
                "authors", lr=1e6, tasks_per_step=1, episodes=30, shot=2, queries=2, heads_options=SMALL, val_every=0
            ),
            cache,
            tmp_path / "diverge",
        )

    runner = CliRunner()
    common = ["train-heads", "--cache", str(cache), "--heads-option", "trm_dim=32", "--val-every", "0"]
    result = runner.invoke(app, [*common, "--way", "7", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "train split" in result.output and "needs 7 classes" in result.output
    assert result.output.rstrip().endswith("; pass --way 6 --shot 1"), result.output  # what fits, as options
    result = runner.invoke(
        app, [*common, "--shot", "3", "--queries", "2", "--val-every", "4", "--out", str(tmp_path / "y")]
    )
    assert (
        result.exit_code == 2 and "val split" in result.output and "needs 5 classes with >= 4 videos" in result.output
    )
    assert "; pass --val-way 5" not in result.output and "no 2 of its classes have the 4 videos" in result.output
    result = runner.invoke(app, [*common, "--episodes", "0", "--out", str(tmp_path / "z")])
    assert result.output.strip().splitlines() == ["error: --episodes 0: must be >= 1"]
    result = runner.invoke(
        app,
        [
            *common,
            "--episodes",
            "4",
            "--shot",
            "2",
            "--queries",
            "2",
            "--lr",
            "0.5",
            "--out",
            str(tmp_path / "run"),
            "--resume",
        ],
    )
    assert result.exit_code == 2 and "lr: 0.001 in the checkpoint, 0.5 asked" in result.output
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "config.json").write_text(json.dumps({"config": {"backbone": "tiny", "bn": "train"}}))
    result = runner.invoke(app, [*common, "--out", str(tmp_path / "ft"), "--resume"])
    assert result.exit_code == 2 and f"{tmp_path / 'ft'}: not a train-heads run folder" in result.output


def test_presets():
    assert make_config("authors", "ssv2").lr == 1e-3
    authors = make_config("authors", "hmdb51", val_every=100)
    assert (authors.lr, authors.optimizer, authors.loss_reduction, authors.tasks_per_step) == (1e-4, "sgd", "sum", 16)
    assert authors.val_every == 112  # validation happens between optimiser steps
    frozen = make_config("frozen", "hmdb51", lr=5e-4)
    assert (frozen.lr, frozen.tasks_per_step, frozen.loss_reduction, frozen.standardize) == (5e-4, 1, "mean", True)
    with pytest.raises(TrainError, match=r"--episodes 20: must be a multiple of --tasks-per-step \(16\)"):
        make_config("authors", episodes=20)


def test_ddp_on_two_cpu_processes_gives_the_gradients_of_one_process(tmp_path):
    """One SGD step at lr 1 moves the weights by exactly minus the gradient of the step's 16 tasks.

    With lambda_qc 0 the QC weights get no gradient: DDP must not wait for them.
    """
    cache = write_random_cache(tmp_path / "cache", splits={"train": (6, 5, 2)}, dim=32)
    args = [
        "--cache",
        str(cache),
        "--preset",
        "authors",
        "--episodes",
        "16",
        "--shot",
        "2",
        "--queries",
        "2",
        "--heads-option",
        "trm_dim=32",
        "--lambda-qc",
        "0",
        "--val-every",
        "0",
        "--device",
        "cpu",
    ]
    probe = Path(__file__).with_name("collectives_probe.py")
    script = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(probe),
        "train-heads",
    ]
    env = {**_env(), "COLLECTIVES_LOG": str(tmp_path / "collectives")}
    ddp = subprocess.run(
        [*script, *args, "--lr", "1", "--out", str(tmp_path / "ddp")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert_collectives_on(tmp_path / "collectives", "cpu", ranks=2)

    def one_process(lr: float) -> dict:
        config = make_config(
            "authors",
            episodes=16,
            shot=2,
            queries=2,
            heads_options=SMALL,
            lambda_qc=0.0,
            val_every=0,
            lr=lr,
            device="cpu",
        )
        train(config, cache, tmp_path / f"one-{lr}")
        return torch.load(tmp_path / f"one-{lr}" / "last.pt", weights_only=True)["model"]

    start, single = one_process(0.0), one_process(1.0)
    distributed = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert distributed["world_size"] == 2
    moved = 0
    for key, w0 in start.items():
        if not w0.is_floating_point() or key.startswith("feature_"):
            continue
        grad_one, grad_ddp = w0 - single[key], w0 - distributed["model"][key]
        torch.testing.assert_close(grad_ddp, grad_one, rtol=1e-4, atol=1e-6, msg=key)
        moved += int(grad_one.abs().max() > 0)
    assert moved >= 10


def test_a_world_that_does_not_divide_a_step_is_refused_before_the_cache_is_opened(tmp_path, monkeypatch):
    config = make_config("frozen", episodes=4, heads_options=SMALL, val_every=0)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun, before the process group exists
    with pytest.raises(TrainError, match="2 processes share the 1 tasks.*--tasks-per-step must be a multiple of 2"):
        train(config, tmp_path / "no-cache", tmp_path / "run")
    assert make_config("frozen", episodes=32, tasks_per_step=16).tasks_per_step == 16


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # every step is skipped, by design
def test_fp16_steps_skipped_by_the_loss_scaler_end_as_divergence(tmp_path, monkeypatch):
    """With every gradient infinite the GradScaler would skip steps forever; the loop stops after SKIPPED_STEPS."""
    from pipeline.heads import STRMHeads
    from pipeline.training.loop import SKIPPED_STEPS

    cache = write_random_cache(tmp_path / "cache", splits={"train": (6, 5, 2)}, dim=32)
    monkeypatch.setattr(
        "pipeline.runtime.distributed.autocast_dtype", lambda amp, device: torch.float16
    )  # the scaler on, on CPU
    loss = STRMHeads.loss
    monkeypatch.setattr(STRMHeads, "loss", lambda self, *a, **k: loss(self, *a, **k) * float("inf"))
    config = make_config("frozen", episodes=30, shot=2, queries=2, heads_options=SMALL, val_every=0)
    with pytest.raises(
        TrainError, match=rf"tasks 0-{SKIPPED_STEPS - 1} is not finite \({SKIPPED_STEPS} steps in a row"
    ):
        train(config, cache, tmp_path / "run")


def test_train_heads_autocast_falls_back_to_fp16_without_bfloat16(monkeypatch):
    from pipeline.runtime.distributed import DeviceError, autocast_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Old GPU")
    cuda = torch.device("cuda", 0)
    assert autocast_dtype(True, cuda) is torch.float16 and autocast_dtype(True, torch.device("cpu")) is None
    with pytest.raises(DeviceError, match="Old GPU has no bfloat16: use --amp fp16"):
        autocast_dtype("bf16", cuda)  # finetune's --amp, which can say fp16


def test_metrics_lines_that_are_not_records_name_the_file_and_line(tmp_path):
    from pipeline.training.runs import RunError

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "task": 1}\n\n{"kind": "train", "ta\n{"kind": "val", "task": 2}\n')
    with pytest.raises(RunError, match=r"metrics.jsonl: line 3 is not JSON"):
        read_metrics(tmp_path)
    path.write_text('{"kind": "train", "task": 1}\n{"kind": "val"}\n')
    with pytest.raises(RunError, match=r"metrics.jsonl: line 2 is not a metrics record"):
        read_metrics(tmp_path)
    path.write_text('{"kind": "train", "task": 1}\n{"kind": "val", "ta')
    assert read_metrics(tmp_path) == [{"kind": "train", "task": 1}]  # a last line torn by a kill


def test_a_resumed_run_does_not_log_its_tasks_twice_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.training.runs import RunLog

    for start, resumed_at in ((1, None), (3, 2)):  # killed after task 4, last.pt at task 2
        log = RunLog(tmp_path, tensorboard=True)
        log.start({}, resumed_at)
        for task in range(start, 5):
            log.write({"kind": "train", "task": task, "loss": float(task)})
        log.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_a_finished_run_folder_is_never_overwritten_unless_asked(tmp_path):
    """Deleting last.pt (as large as best.pt) and training again into the same --out used to replace
    best.pt, metrics.jsonl and config.json silently: any earlier run file now stops a new run."""
    cache = write_random_cache(tmp_path / "cache", splits={"train": (6, 5, 2), "val": (5, 3, 1)}, dim=32)
    config = make_config("frozen", episodes=4, shot=2, queries=2, heads_options=SMALL, val_every=2, val_episodes=5)
    out = tmp_path / "run"
    train(config, cache, out)
    (out / "last.pt").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {"best.pt", "metrics.jsonl", "config.json"} <= set(before)
    with pytest.raises(TrainError, match=r"holds an earlier run \(config.json, metrics.jsonl, best.pt"):
        train(config, cache, out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # every file as it was
    train(config, cache, out, overwrite=True)
    assert (out / "last.pt").exists() and read_metrics(out)[-1]["task"] == 4


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_train_heads_into_a_finished_folder_needs_resume_or_overwrite(tmp_path):
    """The CLI side of the rule above: a rerun without flags is one error line naming both ways on, and
    leaves every file as it was; --resume with --overwrite is a usage error; --overwrite trains anew."""
    from stages.app import app

    cache = write_random_cache(tmp_path / "cache", splits={"train": (6, 5, 2), "val": (5, 3, 1)}, dim=32)
    out = tmp_path / "run"
    args = ["train-heads", "--cache", str(cache), "--episodes", "4", "--shot", "2", "--queries", "2"]
    args += ["--heads-option", "trm_dim=32", "--val-every", "2", "--val-episodes", "5", "--tensorboard"]
    args += ["--out", str(out)]
    runner = CliRunner()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    before, written = _files(out), (out / "last.pt").stat().st_mtime_ns
    assert {"config.json", "metrics.jsonl", "last.pt", "best.pt"} <= set(before)
    assert len([name for name in before if name.startswith("tb/")]) == 1

    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "holds an earlier run" in errors[0], result.output
    assert "--resume" in errors[0] and "--overwrite" in errors[0]
    assert result.output.rstrip().endswith(errors[0])  # the last line: nothing after it
    assert _files(out) == before  # every file byte-identical

    result = runner.invoke(app, [*args, "--resume", "--overwrite"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --resume and --overwrite exclude each other: continue the run in --out or replace it"
    ]
    assert _files(out) == before

    result = runner.invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert read_metrics(out)[-1]["task"] == 4 and (out / "last.pt").exists() and (out / "best.pt").exists()
    assert (out / "last.pt").stat().st_mtime_ns > written
    assert len([n for n in _files(out) if n.startswith("tb/")]) == 1  # the earlier run's events were removed


def test_best_pt_written_after_last_pt_is_not_replaced_by_a_worse_replay(tmp_path):
    """A run killed between best.pt and last.pt resumes from an older last.pt; the best.pt on disk is
    newer. A replayed validation that is worse (on a GPU a replay is not bit-identical) keeps it."""
    cache = write_random_cache(tmp_path / "cache", splits={"train": (6, 5, 2), "val": (5, 3, 1)}, dim=32)
    config = make_config(
        "frozen", episodes=8, shot=2, queries=2, heads_options=SMALL, val_every=4, val_episodes=5, checkpoint_every=4
    )
    out = tmp_path / "run"
    train(replace(config, episodes=4), cache, out)  # last.pt at task 4 vouches for best.pt of task 4
    early = (out / "last.pt").read_bytes()
    state = torch.load(out / "last.pt", weights_only=True)["state"]
    assert state["best_sha256"] is not None
    best = torch.load(out / "best.pt", weights_only=True)
    best["val"]["accuracy"], best["task_index"] = 101.0, 8  # as if a later validation (task 8) had been saved
    torch.save(best, out / "best.pt")
    newer = (out / "best.pt").read_bytes()
    (out / "last.pt").write_bytes(early)
    result = train(config, cache, out, resume=True)
    assert (out / "best.pt").read_bytes() == newer  # a replay at 100% or less does not replace it
    assert result.best_val_accuracy == 101.0 and result.best_task == 8
    assert any("best.pt was saved after last.pt" in n for n in result.notes)


def test_validation_tasks_may_have_their_own_way(tmp_path):
    """A val split of 3 classes cannot give 5-way tasks: the error names the --val-way it allows; with it the
    run validates 3-way, records it, and a resume with another --val-way is refused; --val-way equal to
    --way is the default run, bit for bit."""
    from stages.app import app

    cache = write_random_cache(tmp_path / "cache", splits={"train": (6, 5, 2), "val": (3, 4, 1)}, dim=32)
    common = ["train-heads", "--cache", str(cache), "--heads-option", "trm_dim=32", "--shot", "2", "--queries", "2"]
    common += ["--episodes", "4", "--val-every", "2", "--val-episodes", "5", "--checkpoint-every", "2"]
    runner = CliRunner()
    result = runner.invoke(app, [*common, "--out", str(tmp_path / "five")])
    assert result.exit_code == 2
    assert "val split: a 5-way 2-shot task" in result.output
    assert "; pass --val-way 3, or train without validation (--val-every 0)" in result.output
    out = tmp_path / "three"
    result = runner.invoke(app, [*common, "--val-way", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["config"]["val_way"] == 3
    assert torch.load(out / "last.pt", weights_only=True)["config"]["val_way"] == 3
    assert [r["task"] for r in read_metrics(out) if r["kind"] == "val"] == [2, 4]
    result = runner.invoke(app, [*common, "--val-way", "2", "--out", str(out), "--resume"])
    assert result.exit_code == 2 and "val_way: 3 in the checkpoint, 2 asked" in result.output

    assert make_config(val_way=5) == make_config()  # the training way: recorded as the default
    with pytest.raises(TrainError, match="--val-way 1: a task tells apart >= 2 classes"):
        make_config(val_way=1)
    base = dict(episodes=2, shot=2, queries=2, heads_options=SMALL, val_every=2, val_episodes=3)
    splits = {"train": (6, 5, 2), "val": (5, 4, 1)}
    five = write_random_cache(tmp_path / "five-classes", splits=splits, dim=32)
    train(make_config(**base), five, tmp_path / "a")
    train(make_config(**base, val_way=5), five, tmp_path / "b")
    _same_run(tmp_path / "a", tmp_path / "b")


def test_heads_options_name_the_key_the_type_and_the_known_keys(tmp_path):
    """--heads-option trm_dim=abc used to reach torch as a raw error; every key the heads take is checked."""
    from pipeline.heads.variants import DEFAULT_OPTIONS, VARIANTS
    from pipeline.training.train import HEADS_OPTIONS
    from stages.app import app

    fixed = {"frames", "patches", "lambda_qc"}
    assert set(HEADS_OPTIONS) == (set(DEFAULT_OPTIONS) | set(VARIANTS["strm"])) - fixed
    known = "known keys: trm_dim, psi_dim, qc_dim"
    with pytest.raises(TrainError, match=r'--heads-option trm_dim="abc": trm_dim takes an integer >= 1.*' + known):
        make_config(heads_options={"trm_dim": "abc"})
    with pytest.raises(TrainError, match=r"--heads-option trm_dim=true: trm_dim takes an integer"):
        make_config(heads_options={"trm_dim": True})
    with pytest.raises(TrainError, match=r"--heads-option trm_size=64: no heads option 'trm_size'; " + known):
        make_config(heads_options={"trm_size": 64})
    with pytest.raises(TrainError, match=r"--heads-option cardinalities=\[2, 0\]: cardinalities takes a list"):
        make_config(heads_options={"cardinalities": [2, 0]})
    with pytest.raises(TrainError, match=r'--heads-option ple="mlp": ple takes "attention", "mixer" or null'):
        make_config(heads_options={"ple": "mlp"})
    ok = {"trm_dim": 32, "psi_dim": None, "cardinalities": [2, 3], "tuple_keep": 0.5, "fle": None, "qc": False}
    assert make_config(heads_options=ok).heads_options == ok
    cache = write_random_cache(tmp_path / "cache", splits={"train": (6, 5, 2)}, dim=32)
    result = CliRunner().invoke(app, ["train-heads", "--cache", str(cache), "--heads-option", "trm_dim=abc"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        'error: --heads-option trm_dim="abc": trm_dim takes an integer >= 1, e.g. 64; known keys: '
        + ", ".join(HEADS_OPTIONS)
    ]


def test_train_heads_on_cpu_says_its_speed_and_the_whole_runs_time(tmp_path):
    """After the timed first tasks the run's length in time is printed once, and the run goes on."""
    from pipeline.training.state import Estimate
    from stages.app import app

    cache = write_random_cache(tmp_path / "cache", splits={"train": (6, 5, 2)}, dim=32)
    args = ["train-heads", "--cache", str(cache), "--heads-option", "trm_dim=32", "--shot", "2", "--queries", "2"]
    args += ["--episodes", "6", "--val-every", "0", "--device", "cpu", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    timed = [line for line in result.output.splitlines() if line.startswith("timed: ")]
    assert len(timed) == 1 and " tasks/s on cpu; 6 tasks ≈ " in timed[0], result.output
    assert timed[0].endswith("; --episodes N for a shorter run")
    assert read_metrics(tmp_path / "run")[-1]["task"] == 6
    assert Estimate(2.0, 9_998, "cpu", run_tasks=10_000).line() == "timed: 0.50 tasks/s on cpu; 10,000 tasks ≈ 5.6 h"
    resumed = Estimate(0.5, 4_000, "cpu", run_tasks=10_000, first_task=6_000, world=2)
    assert resumed.line() == "timed: 4.00 tasks/s on cpu; 10,000 tasks ≈ 42 min (33 min from task 6,000 on)"


def test_an_interrupted_train_heads_says_what_last_pt_holds_and_how_to_resume(tmp_path):
    """Ctrl-C (SIGINT to the process group) mid-run: exit 130, no traceback, one line naming the task
    reached, the task last.pt holds and the command with --resume (and without --overwrite)."""
    cache = write_random_cache(tmp_path / "cache", splits={"train": (6, 5, 2)}, dim=32)
    out = tmp_path / "run"
    args = ["--cache", str(cache), "--heads-option", "trm_dim=32", "--shot", "2", "--queries", "2"]
    args += ["--episodes", "100000", "--val-every", "0", "--checkpoint-every", "3", "--out", str(out), "--overwrite"]
    command = [sys.executable, "-m", "stages.app", "train-heads", *args]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True, env=_env())
    deadline = time.monotonic() + 240
    while not (out / "last.pt").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert process.poll() is None, "train-heads ended before it could be interrupted"
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err, err
    last = err.rstrip().splitlines()[-1]
    saved = torch.load(out / "last.pt", weights_only=True)["task_index"]
    resume = " ".join(["strm", "train-heads", *args[:-1], "--resume"])
    found = re.fullmatch(r"interrupted: at task (\d+), (.+) holds task (\d+); run `(.+)` to continue", last)
    assert found is not None, last
    reached, path, held, said = found.groups()
    assert path == str(out / "last.pt") and int(held) == saved and int(reached) >= saved > 0, last
    assert said == resume, last
