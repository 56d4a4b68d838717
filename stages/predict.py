"""`strm predict`: actions recognised in your own clips and long recordings, from a few labelled examples.

The support is a folder with one sub-folder per action (or an index saved by --save-support);
queries are video files or folders. pipeline/predict/recognizer.py says how clips become the checkpoint's features.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from pipeline.features.weights import WeightsUnavailable
from pipeline.predict.clips import PredictError
from pipeline.predict.outputs import timeline_figure, write_csv
from pipeline.predict.recognizer import FewShotRecognizer, parse_unknown
from pipeline.runtime.distributed import DeviceError
from stages.common import fail, progress_bar

console = Console(stderr=True)


# Over 80 lines for its 17 option declarations; the body is under 80.
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
    json_out: Path | None = typer.Option(None, "--json", help="Write every result as JSON."),
    csv_out: Path | None = typer.Option(None, "--csv", help="Write one row per query as CSV."),
    save_support: Path | None = typer.Option(
        None,
        "--save-support",
        help="Save the support's embeddings (safetensors) for later runs: --support FILE skips decoding them.",
    ),
    backbone: str | None = typer.Option(
        None, "--backbone", help="With `proto`: the frozen backbone (a name or preset)."
    ),
    weights: Path | None = typer.Option(
        None,
        "--weights",
        help="The backbone's weights file when they cannot be "
        "downloaded (safetensors or torch; a fine-tune checkpoint works too).",
    ),
    allow_other_weights: bool = typer.Option(
        False,
        "--allow-other-weights",
        help="Go on when the weights' sha256 differs from the one the heads were trained on (the output says so).",
    ),
    window: float | None = typer.Option(
        None, "--window", min=0.1, help="Long recordings: classify windows of this many seconds."
    ),
    stride: float | None = typer.Option(
        None, "--stride", min=0.1, help="Seconds between window starts. (default: --window)"
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
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:N."),
    batch_size: int = typer.Option(64, "--batch-size", min=8, help="Frames per backbone call."),
    workers: int = typer.Option(min(2, os.cpu_count() or 1), "--workers", min=0, help="Decoding worker processes."),
) -> None:
    """Label query clips (and windows of long recordings) with the support's actions, with calibrated probabilities."""
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
        for note in recognizer.notes:
            console.print(f"note: {note}", highlight=False)
        with progress_bar(console, transient=True) as bar:
            row = bar.add_task("support clips", total=None)
            shown = len(recognizer.notes)
            chosen = recognizer.add_support(support, lambda done, total: bar.update(row, completed=done, total=total))
            for note in recognizer.notes[shown:]:  # what the support set taught (e.g. nothing to calibrate on)
                console.print(f"note: {note}", highlight=False)
            if save_support is not None:
                recognizer.save_support(save_support)
            row = bar.add_task("queries", total=None)
            records = recognizer.predict(
                queries or [],
                top_k=top_k,
                window=window,
                stride=stride,
                unknown=rule,
                progress=lambda done, total: bar.update(row, completed=done, total=total),
            )
    except DeviceError as err:
        fail(str(err), 2)
    except (PredictError, WeightsUnavailable, FileNotFoundError, ValueError) as err:  # PredictError is a ValueError
        fail(str(err))
    for path, reason in chosen.failed:
        console.print(f"support clip skipped: {path}: {reason}", highlight=False, soft_wrap=True)
    console.print(
        f"{len(chosen.used)} support clips of {len(chosen.actions)} actions; temperature "
        f"{chosen.calibration.temperature:.3g}" + (f"; saved to {save_support}" if save_support else ""),
        highlight=False,
    )
    table = Table(title="predictions", title_justify="left")
    for column in ("query", "action", "probability", "runner-up"):
        table.add_column(column)
    for r in records:
        second = f"{r['top_k'][1][0]} ({r['top_k'][1][1]:.3f})" if len(r["top_k"]) > 1 else ""
        table.add_row(
            r["path"],
            r["prediction"] or f"failed: {r['reason']}",
            f"{r['probability']:.3f}" if r["probability"] is not None else "",
            second,
        )
    Console().print(table)
    report = recognizer.report(records)
    try:
        for k, r in enumerate(records):
            if r.get("windows"):  # numbered: recordings of one name in two folders keep a figure each
                name = f"{k:03d}_{Path(r['path']).stem}_timeline.png"
                r["timeline"] = str(timeline_figure(r, chosen.actions, figures / name))
                console.print(f"timeline: {r['timeline']}", highlight=False)
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(report, indent=1) + "\n")
        if csv_out is not None:
            write_csv(csv_out, records)
    except OSError as err:
        fail(f"{err.filename}: cannot write ({err.strerror})")


def register(app: typer.Typer) -> None:
    """Add `strm predict` to the app."""
    app.command("predict", help=predict_command.__doc__)(predict_command)
