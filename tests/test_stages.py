"""What every stage owes a user: one device resolver with one message, best.pt whatever the validation,
errors that say what to do, and stage modules that only talk (no stage imports another, none grows fat)."""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipeline.features.copies import write_random_cache
from stages.app import app

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("stage", ["extract", "train-heads", "finetune", "evaluate", "ablate", "predict"])
def test_device_cuda_without_cuda_is_one_line_in_every_stage(stage, tmp_path):
    cache = write_random_cache(
        tmp_path / "cache", splits={"train": (6, 5, 2), "val": (5, 3, 1), "test": (5, 3, 1)}, dim=32
    )
    args = {
        "extract": ["extract", "toy", "--videos", str(tmp_path)],
        "train-heads": ["train-heads", "--cache", str(cache), "--out", str(tmp_path / "run")],
        "finetune": ["finetune", "toy", "--from", str(tmp_path / "none.pt"), "--videos", str(tmp_path)],
        "evaluate": ["evaluate", "--cache", str(cache), "--baseline", "proto"],
        "ablate": ["ablate", "--cache", str(cache), "--out", str(tmp_path / "ablate")],
        "predict": [
            "predict",
            "--checkpoint",
            "proto",
            "--backbone",
            "tiny",
            "--support",
            str(tmp_path),
            str(tmp_path),
        ],
    }[stage]
    result = CliRunner().invoke(app, [*args, "--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == ["error: --device cuda: CUDA is not available on this machine"]


def test_train_heads_without_validation_writes_best_pt_for_the_next_command(tmp_path):
    cache = write_random_cache(tmp_path / "cache", splits={"train": (6, 5, 2), "test": (5, 3, 1)}, dim=32)
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "train-heads",
            "--cache",
            str(cache),
            "--episodes",
            "4",
            "--shot",
            "2",
            "--queries",
            "2",
            "--heads-option",
            "trm_dim=32",
            "--val-every",
            "0",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    last, best = (torch.load(out / name, weights_only=True) for name in ("last.pt", "best.pt"))
    assert best["task_index"] == last["task_index"] == 4 and best["val"] is None
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--cache",
            str(cache),
            "--checkpoint",
            str(out / "best.pt"),
            "--episodes",
            "5",
            "--shot",
            "2",
            "--json",
            str(tmp_path / "eval.json"),
        ],
    )
    assert result.exit_code == 0, result.output


def test_a_val_split_with_too_few_classes_says_what_to_do(tmp_path):
    cache = write_random_cache(tmp_path / "cache", splits={"train": (6, 5, 2), "val": (4, 6, 1)}, dim=32)
    result = CliRunner().invoke(
        app,
        [
            "train-heads",
            "--cache",
            str(cache),
            "--shot",
            "2",
            "--queries",
            "2",
            "--heads-option",
            "trm_dim=32",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 2
    assert "val split" in result.output
    assert "; pass --val-way 4, or train without validation (--val-every 0)" in result.output


def _imports(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


def test_stages_only_talk_and_the_library_never_imports_them():
    for path in sorted((REPO / "stages").glob("*.py")):
        others = {m for m in _imports(path) if m.startswith("stages") and m not in ("stages.common",)}
        if path.name != "app.py":  # the app registers them (by name, with importlib)
            assert not others, f"{path.name} imports {others}"
        assert len(path.read_text().splitlines()) <= 200, f"{path.name} holds library work: move it to pipeline/"
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        assert not {m for m in _imports(path) if m.startswith("stages")}, f"{path} imports a stage"
        source = path.read_text()
        assert not re.search(r"(?<![\w.])print\(|sys\.exit|\btyper\b", source), path


def test_tensorboard_gets_the_metrics_scalars_and_a_missing_package_is_one_line(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cache = write_random_cache(tmp_path / "cache", splits={"train": (6, 5, 2), "val": (5, 3, 1)}, dim=32)
    common = [
        "train-heads",
        "--cache",
        str(cache),
        "--episodes",
        "4",
        "--shot",
        "2",
        "--queries",
        "2",
        "--heads-option",
        "trm_dim=32",
        "--val-every",
        "2",
        "--val-episodes",
        "5",
        "--tensorboard",
    ]
    result = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/accuracy", "train/lr", "train/tasks_per_s", "val/accuracy"} <= tags
    assert [e.step for e in events.Scalars("val/accuracy")] == [2, 4]
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    result = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "run2")])
    assert result.exit_code == 2 and "pip install 'strm[tensorboard]'" in result.output


def test_version_and_the_backbone_list():
    from stages.app import app

    runner = CliRunner()
    out = runner.invoke(app, ["--version"])
    assert out.exit_code == 0 and out.output.startswith("strm ")
    out = runner.invoke(app, ["backbones"], env={"COLUMNS": "160"})
    assert out.exit_code == 0, out.output
    rows = {line.split("│")[1].strip(): line for line in out.output.splitlines() if line.count("│") >= 5}
    assert "2048" in rows["resnet50"] and "layer4" in rows["resnet50"]
    assert "1280" in rows["tf_efficientnet_lite0"] and "384" in rows["dinov2_vits14"]


def test_info_tells_what_a_checkpoint_and_a_cache_hold(tmp_path):
    from stages.app import app

    cache = write_random_cache(tmp_path / "cache", splits={"train": (6, 5, 2), "val": (5, 3, 1)}, dim=32)
    runner = CliRunner()
    args = ["train-heads", "--cache", str(cache), "--episodes", "4", "--shot", "2", "--queries", "2"]
    args += ["--heads-option", "trm_dim=32", "--val-every", "2", "--val-episodes", "5", "--out", str(tmp_path / "run")]
    assert runner.invoke(app, args).exit_code == 0
    out = runner.invoke(app, ["info", str(tmp_path / "run" / "best.pt")])
    assert out.exit_code == 0, out.output
    assert "kind: heads" in out.output and "variant: strm" in out.output and "dim: 32" in out.output
    assert "class_names: train_class_000, train_class_001" in out.output and "tasks_trained: " in out.output
    assert "best_validation: " in out.output and "recipe:" in out.output
    out = runner.invoke(app, ["info", str(cache)])
    assert out.exit_code == 0 and "val_class_004" in out.output and "done: 15" in out.output
    out = runner.invoke(app, ["info", str(tmp_path / "nothing.pt")])
    assert out.exit_code == 2 and "no such checkpoint or cache" in out.output


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_a_stage_with_one_line_and_no_worker_tracebacks(signum, tmp_path):
    """SIGTERM to the main process (a scheduler, `kill`) and SIGINT to the whole group (Ctrl-C in a
    terminal) stop `strm synth` mid-run: exit 130, one `interrupted:` line naming the command to rerun."""
    out = tmp_path / "vids"
    command = [sys.executable, "-m", "stages.app", "synth", "--out", str(out), "--videos-per-class", "50"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while not any(out.rglob("*.mp4")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert process.poll() is None, "synth ended before it could be interrupted"
    if signum == signal.SIGINT:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    try:
        _, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # say which processes still hold on, then end them
        left = subprocess.run(["ps", "-o", "pid,stat,wchan:20,args", "-g", str(process.pid)], capture_output=True)
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"still running 120 s after the signal:\n{left.stdout.decode()}")
    assert process.returncode == 130, err
    assert "Traceback" not in err and "Error" not in err, err
    assert err.rstrip().splitlines()[-1].startswith("interrupted: what was done is kept; run `strm synth --out ")


def test_an_interrupted_training_run_names_the_command_that_continues_it(tmp_path, monkeypatch):
    """--overwrite would replace what was saved (and excludes --resume): the line's command drops it and
    adds --resume once; before the first last.pt it says so."""
    from stages import common
    from stages.common import interrupted_line, on_interrupt, resume_command, training_interrupted

    monkeypatch.setattr(sys, "argv", ["strm", "train-heads", "--cache", "my cache", "--overwrite"])
    assert resume_command() == "strm train-heads --cache 'my cache' --resume"
    monkeypatch.setattr(sys, "argv", ["strm", "finetune", "toy", "--resume", "--episodes", "8"])
    assert resume_command() == "strm finetune toy --resume --episodes 8"
    on_interrupt(lambda: training_interrupted(tmp_path, 12))
    try:
        assert interrupted_line("unused") == (
            "interrupted: at task 12, no last.pt was written yet; run `strm finetune toy --resume --episodes 8` to continue"
        )
    finally:
        common._INTERRUPT_NOTE.clear()  # the next test in this process is not interrupted mid-run


def test_the_command_line_imports_no_torch_until_a_command_runs():
    """`strm --help` and every stage's --help are Typer's alone: the app and its stage modules import the
    library (torch, pandas, the decoders) inside the commands (`make bench ONLY=help` times it)."""
    probe = "import sys, stages.app; print(sorted(m for m in ('torch', 'pandas', 'matplotlib') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert done.stdout.strip() == "[]", done.stdout
