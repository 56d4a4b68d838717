"""Run folders: file names, atomic writes, the metrics log (JSON lines, optionally TensorBoard) and resume rules.

A training run (train-heads or finetune) writes `config.json`, `metrics.jsonl`, `last.pt`,
`best.pt`, `curve.png` and, with TensorBoard on, `tb/`. Text files are replaced atomically (temp
file + rename) and checkpoints too (heads.save_heads), so a kill never leaves half a file; a
metrics line torn by a kill is dropped when the run resumes.

Which settings may change when a run resumes is declared once, on the config dataclass's fields:
`field(..., metadata=FREE)` (they do not change the numbers: device, loading, workers) or
`metadata=INHERIT` (None asks for the run's own value). Every other setting must be the run's.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.runtime.files import replace_durably

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

LAST, BEST, CONFIG, METRICS, CURVE, TENSORBOARD = (
    "last.pt",
    "best.pt",
    "config.json",
    "metrics.jsonl",
    "curve.png",
    "tb",
)
FREE = {"on_resume": "free"}
INHERIT = {"on_resume": "inherit"}


RUN_FILES = (CONFIG, METRICS, LAST, BEST, CURVE, TENSORBOARD)


def earlier_run(out: Path) -> list[str]:
    """The files of an earlier run in `out` (any of them: a deleted last.pt still leaves best.pt)."""
    return [name for name in RUN_FILES if (out / name).exists()]


def clear_run(out: Path) -> None:
    """Remove an earlier run's files from `out` (asked for with --overwrite); nothing else in it."""
    import shutil

    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for partial in [*out.glob("*.tmp"), *out.glob("*.partial")]:
        partial.unlink(missing_ok=True)


class RunError(ValueError):
    """A run folder or a resumed run that does not fit what was asked; the message names what."""


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename: a reader sees the old file or the new one, never half,
    and after a power loss too (the data is on the disk before the rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    replace_durably(tmp, path)


def read_metrics(out: Path | str) -> list[dict]:
    """The records of a run's metrics.jsonl (train and val lines), in order.

    A last line cut short by a kill is dropped: the resumed run writes it again. Any other line
    that is not a record ({"kind": ..., "task": N, ...}) is a RunError naming it.
    """
    path = Path(out) / METRICS
    if not path.exists():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for k, (n, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if k == len(lines) - 1:
                break
            raise RunError(
                f"{path}: line {n} is not JSON (cut short?); delete the line or start a new run folder"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("task"), int) or "kind" not in record:
            raise RunError(f'{path}: line {n} is not a metrics record (no "kind" and integer "task")')
        records.append(record)
    return records


def saved_settings(out: Path | str) -> dict:
    """The settings the run in `out` was started with (its config.json), empty when there is none."""
    path = Path(out) / CONFIG
    if not path.exists():
        return {}
    return dict(json.loads(path.read_text())["config"])


def resume_differences(config: Any, saved: dict, also_free: tuple[str, ...] = ()) -> list[str]:
    """The settings of `config` that differ from a checkpoint's `saved` ones and may not change on resume.

    A setting the checkpoint does not record (written by an older version) counts as its default.
    """
    differ = []
    for f in fields(config):
        rule = f.metadata.get("on_resume")
        mine = getattr(config, f.name)
        if rule == "free" or f.name in also_free or (rule == "inherit" and mine is None):
            continue
        default = (
            f.default
            if f.default is not MISSING
            else (f.default_factory() if f.default_factory is not MISSING else None)
        )
        theirs = saved.get(f.name, default)
        if theirs != mine:
            differ.append(f"{f.name}: {theirs!r} in the checkpoint, {mine!r} asked")
    return differ


class RunLog:
    """metrics.jsonl of a run (rank 0), and the same scalars in TensorBoard when asked."""

    def __init__(self, out: Path, tensorboard: bool = False) -> None:
        self.out, self.tensorboard = out, tensorboard
        self.writer: SummaryWriter | None = None

    def start(self, record: dict, resumed_at: int | None) -> None:
        """config.json, and metrics.jsonl (and TensorBoard's events) emptied (new run) or cut back to task
        `resumed_at` (resume): the tasks after it are written again."""
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RunError(
                    "--tensorboard needs the tensorboard package: pip install 'strm[tensorboard]' "
                    "(or pip install tensorboard)"
                ) from None
        self.out.mkdir(parents=True, exist_ok=True)
        if resumed_at is None:
            write_atomic(self.out / METRICS, "")
        else:
            keep = [r for r in read_metrics(self.out) if r["task"] <= resumed_at]
            write_atomic(self.out / METRICS, "".join(json.dumps(r) + "\n" for r in keep))
        write_atomic(self.out / CONFIG, json.dumps(record, indent=2) + "\n")
        if self.tensorboard:  # purge_step: TensorBoard drops the events of a killed run from that step on
            purge = 0 if resumed_at is None else resumed_at + 1
            self.writer = SummaryWriter(str(self.out / TENSORBOARD), purge_step=purge)

    def write(self, line: dict) -> None:
        """Append one record ({"kind": "train" | "val", "task": N, ...}); numbers also go to TensorBoard."""
        with open(self.out / METRICS, "a") as f:
            f.write(json.dumps(line) + "\n")
        if self.writer is not None:
            for key, value in line.items():
                if key not in ("kind", "task") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{line['kind']}/{key}", value, line["task"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curve(out: Path | str, way: int | None = None) -> Path:
    """Training loss, training and validation accuracy against tasks, as a PNG in the run folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(out)
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot([r["task"] for r in train], [r["loss"] for r in train], color="tab:blue")
        ax_acc.plot(
            [r["task"] for r in train],
            [r["accuracy"] for r in train],
            label="train queries",
            color="tab:blue",
            alpha=0.6,
        )
        if min(r["loss"] for r in train) > 0:
            ax_loss.set_yscale("log")
    if val:
        ax_acc.plot(
            [r["task"] for r in val], [r["accuracy"] for r in val], "o-", label="validation", color="tab:orange"
        )
    if way:
        ax_acc.axhline(100 / way, color="grey", linestyle=":", label="chance")
    ax_loss.set(xlabel="tasks", ylabel="training loss", title="loss")
    ax_acc.set(xlabel="tasks", ylabel="accuracy (%)", title="accuracy")
    ax_acc.legend(loc="lower right")
    fig.tight_layout()
    path = Path(out) / CURVE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
