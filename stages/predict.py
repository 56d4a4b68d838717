"""`strm predict`: actions recognised in your own clips, long recordings and live streams, from a few examples.

The support is a folder with one sub-folder per action (or an index saved by --save-support); queries are
video files or folders, or one live source (--stream). pipeline/predict/recognizer.py says how clips become
the checkpoint's features."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from stages.common import fail, progress_bar, setting

if TYPE_CHECKING:
    from pipeline.predict.recognizer import FewShotRecognizer

console = Console(stderr=True)


# Over 80 lines for its 22 option declarations; the body is under 80.
def predict_command(
    queries: list[Path] = typer.Argument(None, help="Query videos, or folders searched recursively for videos."),
    checkpoint: str = typer.Option(
        ...,
        "--checkpoint",
        help="train-heads or finetune checkpoint, an authors' STRM/TRX "
        "file, or `proto` (nearest class mean of --backbone features, no training).",
    ),
    support: Path = typer.Option(
        ...,
        "--support",
        help="Folder SUPPORT/<action>/<clip> (>= 2 actions, >= 1 clip each, "
        "uneven counts allowed) or a support index from --save-support.",
    ),
    top_k: int = typer.Option(3, "--top-k", min=1, help="Actions listed per query in the JSON."),
    json_out: Path | None = setting("--json", "Write every result as JSON."),
    csv_out: Path | None = setting("--csv", "Write one row per query as CSV."),
    save_support: Path | None = setting(
        "--save-support",
        "Save the support's embeddings (safetensors) for later runs: --support FILE skips decoding them.",
    ),
    backbone: str | None = setting("--backbone", "With `proto`: the frozen backbone (name or preset)."),
    weights: Path | None = setting(
        "--weights",
        "The backbone's weights file when they cannot be "
        "downloaded (safetensors or torch; a fine-tune checkpoint works too).",
    ),
    allow_other_weights: bool = typer.Option(
        False,
        "--allow-other-weights",
        help="Go on when the weights' sha256 differs from the one the heads were trained on (the output says so).",
    ),
    window: float | None = setting("--window", "Windows of this many s (recordings; --stream: 2).", min=0.1),
    stride: float | None = setting("--stride", "Seconds between windows, <= --window. \\[default: --window]", min=0.1),
    min_segment: float | None = setting(
        "--min-segment", "Shorter segments (s) join a neighbour. \\[default: window/2]", min=0.0
    ),
    unknown: str = typer.Option(
        "off",
        "--unknown",
        help="off, auto, or P: label a query `unknown` below a threshold "
        "calibrated on the support (P: the false-rejection rate aimed at; auto = 0.05).",
    ),
    figures: Path = typer.Option(
        Path("runs/predict"), "--figures", help="Folder for the timeline PNGs of windowed queries."
    ),
    stream: str | None = setting(
        "--stream", "A live source, not queries: /dev/video0, a rtsp/http/tcp/udp URL, a growing file."
    ),
    jsonl: Path | None = setting(
        "--jsonl",
        "With --stream: the JSON lines' file. \\[default: stdout]",
    ),
    reconnect: int = typer.Option(3, "--reconnect", min=0, help="Tries after a stream drops (1, 2, 4 s... apart)."),
    annotate: Path | None = setting(
        "--annotate", "Write the queries with their predictions drawn (OUT.mp4; OUT-<name>.mp4 for several)."
    ),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:N."),
    batch_size: int = typer.Option(64, "--batch-size", min=8, help="Frames per backbone call."),
    workers: int = typer.Option(min(2, os.cpu_count() or 1), "--workers", min=0, help="Decoding worker processes."),
) -> None:
    """Label clips, windows of long recordings or a live stream (--stream) with the support's actions and probabilities."""
    from pipeline.features.weights import WeightsUnavailable
    from pipeline.predict.clips import PredictError
    from pipeline.predict.recognizer import FewShotRecognizer, parse_unknown
    from pipeline.predict.saved import save_outputs
    from pipeline.runtime.distributed import DeviceError

    if stream is not None and (queries or json_out or csv_out):
        fail("--stream reads one live source: it takes no query paths, and writes --jsonl (not --json or --csv)")
    try:
        rule = parse_unknown(unknown)
        recognizer = FewShotRecognizer.from_checkpoint(
            checkpoint,
            backbone=backbone,
            weights=weights,
            allow_other_weights=allow_other_weights,
            device=device,
            batch_size=batch_size,
            workers=workers,
        )
        _notes(recognizer.notes, 0)
        with progress_bar(console, transient=True) as bar:
            row = bar.add_task("support clips", total=None)
            shown = len(recognizer.notes)
            chosen = recognizer.add_support(support, lambda done, total: bar.update(row, completed=done, total=total))
            shown = _notes(recognizer.notes, shown)  # what the support set taught (e.g. nothing to calibrate on)
            if save_support is not None:
                recognizer.save_support(save_support)
            row = bar.add_task("queries", total=None)
            progress = lambda done, total: bar.update(row, completed=done, total=total)  # noqa: E731
            shared: dict[str, Any] = {"top_k": top_k, "stride": stride, "unknown": rule, "min_segment": min_segment}
            records = [] if stream else recognizer.predict(queries or [], window=window, progress=progress, **shared)
    except DeviceError as err:
        fail(str(err), 2)
    except (PredictError, WeightsUnavailable, FileNotFoundError, ValueError) as err:  # PredictError is a ValueError
        fail(str(err))
    for path, reason in chosen.failed:
        console.print(f"support clip skipped: {path}: {reason}", highlight=False, soft_wrap=True)
    for path in chosen.ignored + recognizer.ignored:
        console.print(f"ignored (hidden or tool folder): {path}", highlight=False, soft_wrap=True)
    console.print(
        f"{len(chosen.used)} support clips of {len(chosen.actions)} actions; temperature "
        f"{chosen.calibration.temperature:.3g}" + (f"; saved to {save_support}" if save_support else ""),
        highlight=False,
    )
    if chosen.held_out is not None and not chosen.held_out.near_chance():  # near chance it was a note above
        console.print(chosen.held_out.sentence(), highlight=False, soft_wrap=True)
    if stream is not None:
        return _stream(
            recognizer, stream, jsonl, annotate=annotate, window=window or 2.0, reconnect=reconnect, **shared
        )
    _table(records)
    try:
        outputs: dict[str, Any] = {"figures": figures, "json_out": json_out, "csv_out": csv_out, "annotate": annotate}
        for line in save_outputs(records, chosen.actions, recognizer.report, top_k=top_k, **outputs):
            console.print(line, highlight=False)
    except OSError as err:
        fail(f"{err.filename}: cannot write ({err.strerror})")
    if not any(r["status"] == "ok" for r in records):
        fail(f"nothing could be labelled: all {len(records)} queries failed (reasons above)")


def _stream(recognizer: FewShotRecognizer, source: str, jsonl: Path | None, **options) -> None:
    """--stream: JSON lines to stdout or --jsonl, the annotated copy to --annotate; notices (reconnects, skipped
    windows), then a summary, on stderr."""
    from pipeline.predict.clips import PredictError
    from pipeline.predict.stream_lines import run_stream

    try:
        live, lost, video = run_stream(recognizer, source, jsonl, tell=lambda text: console.print(text), **options)
    except PredictError as err:
        fail(str(err))
    except OSError as err:
        fail(f"{err.filename}: cannot write ({err.strerror})")
    console.print(live.sentence(), highlight=False, soft_wrap=True)
    if video is not None:
        console.print(f"annotated: {video}", highlight=False)
    if lost is not None:
        fail(str(lost))


def _notes(notes: list[str], shown: int) -> int:
    """Print the notes from `shown` on; the number printed so far."""
    for note in notes[shown:]:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    return len(notes)


def _table(records: list[dict]) -> None:
    """One row per clip, and per segment of a windowed recording; names relative to the folder they share, never cut."""
    from pipeline.predict.outputs import table_rows

    rows, common = table_rows(records)
    table = Table(title="predictions", title_justify="left", caption=f"under {common}" if common else None)
    table.add_column("query", overflow="fold")
    for column in ("action", "probability", "runner-up"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add `strm predict` to the app."""
    app.command("predict", help=predict_command.__doc__)(predict_command)
