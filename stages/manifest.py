"""`strm manifest`: resolve a dataset on disk into a validated manifest, and say what is wrong with it."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pipeline.data.protocol import DATASETS

if TYPE_CHECKING:  # deferred imports' types
    import pandas as pd

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from pipeline.data.protocol import FRAMES

if TYPE_CHECKING:  # the members come from DATASETS at run time, which mypy cannot follow: a str enum to it

    class DatasetName(str, enum.Enum): ...
else:
    DatasetName = enum.Enum("DatasetName", {name: name for name in DATASETS}, type=str)  # Typer shows the choices


def _fail(message: str, code: int) -> typer.Exit:
    """Say what is wrong in one line on stderr; the caller raises the returned Exit."""
    Console(stderr=True).print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def report_path(manifest: Path) -> Path:
    """The bad-video report sits next to its manifest: hmdb51.csv -> hmdb51.report.csv."""
    return manifest.with_name(f"{manifest.stem}.report.csv")


# Over 80 lines for its 8 option declarations; the body is under 80.
def manifest(
    dataset: Annotated[
        DatasetName,
        typer.Argument(help="Which dataset (the list is below).", show_default=False),
    ],
    videos: Annotated[Path, typer.Option("--videos", help="Root folder of the videos (searched recursively).")],
    split_dir: Annotated[
        Path | None,
        typer.Option(
            "--split-dir", help="Folder with trainlist*.txt, vallist*.txt, testlist*.txt (lines class/video_id)."
        ),
    ] = None,
    classes: Annotated[
        Path | None, typer.Option("--classes", help="CSV class,split (the folder dataset; overrides a bundled one).")
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            help="The name later stages know it by (strm extract NAME; cache/NAME/). \\[default: the built-in's; for folder, the videos folder's own name]",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Manifest file, .csv or .parquet. \\[default: data_manifests/local/NAME.csv]",
        ),
    ] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Decoder processes for the check.")] = 2,
    min_frames: Annotated[
        int,
        typer.Option(
            "--min-frames",
            min=1,
            help="Videos with fewer frames are marked too short and left out: L, the authors' rule, which the "
            "benchmarks keep; lower it to keep your own short clips (their frames are repeated).",
        ),
    ] = FRAMES,
) -> None:
    """Find, open and count the frames of every video of a split; write the manifest and a report of bad videos."""
    from pipeline.data.checks import TaskSize, folder_warnings, split_warnings
    from pipeline.data.manifests import (
        LOCAL_MANIFESTS,
        ManifestError,
        bad_kinds,
        bad_videos,
        build_manifest,
        dataset_name,
        split_counts,
        validate_manifest,
        write_manifest,
    )
    from pipeline.training.config import EpisodicConfig

    console = Console()
    dataset = DatasetName(dataset).value
    try:
        name = dataset_name(dataset, videos, name)
        out = out or LOCAL_MANIFESTS / f"{name}.csv"
        if out.suffix.lower() not in (".csv", ".parquet", ".pq"):
            raise ManifestError(f"{out}: a manifest is .csv or .parquet")
        table = build_manifest(dataset, videos, split_dir=split_dir, classes_csv=classes)
        warnings = folder_warnings(videos, classes) if classes is not None and split_dir is None else []
    except ManifestError as exc:
        raise _fail(str(exc), 2) from None

    with Progress(
        TextColumn(f"checking {name} videos"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("check", total=len(table))
        table = validate_manifest(
            table, workers=workers, progress=lambda k: bar.advance(task, k), min_frames=min_frames
        )

    write_manifest(table, out)
    report = report_path(out)
    bad_videos(table).to_csv(report, index=False)

    counts = split_counts(table, dataset)
    console.print(_counts_table(counts, name))

    kinds = bad_kinds(table)
    empty_classes = kinds.pop("missing class", 0)
    summary = f"bad videos: {sum(kinds.values())}"
    if kinds:
        summary += " (" + ", ".join(f"{kind} {n}" for kind, n in kinds.most_common()) + ")"
    if empty_classes:
        summary += f"; classes with no videos: {empty_classes}"
    if kinds or empty_classes:
        summary += f"; listed in {report}"
    console.print(summary, markup=False, highlight=False, soft_wrap=True)
    defaults = EpisodicConfig()  # the tasks train-heads and evaluate draw unless told otherwise
    tasks = {s: TaskSize(defaults.way, defaults.shot, defaults.val_queries) for s in ("val", "test")}
    tasks["train"] = TaskSize(defaults.way, defaults.shot, defaults.queries)
    for warning in warnings + split_warnings(table, tasks):
        Console(stderr=True).print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"manifest: {out} ({len(table)} rows)", markup=False, highlight=False)
    console.print(f"dataset: {name} (later stages take this name: strm extract {name})", markup=False, highlight=False)
    if counts["ok"].sum() == 0:
        raise _fail(f"no usable video under {videos} (see {report})", 1)


def _counts_table(counts: pd.DataFrame, dataset: str) -> Table:
    """Videos per split: listed, usable, the official count and whether they agree."""
    import pandas as pd

    view = Table(title=f"{dataset}: videos per split", title_justify="left")
    for column in ("split", "listed", "ok", "official", "check"):
        view.add_column(column, justify="left" if column in ("split", "check") else "right")
    for split, row in counts.iterrows():
        listed, ok, official = int(row["listed"]), int(row["ok"]), row["official"]
        if pd.isna(official):
            check = ""
        elif listed != official:
            check = f"listed DIFFERS from official by {listed - official:+d}"
        else:
            check = "complete" if ok == official else f"{official - ok} of the official videos not usable"
        view.add_row(split, str(listed), str(ok), "-" if pd.isna(official) else str(official), check)
    return view


def register(app: typer.Typer) -> None:
    """Add `strm manifest`."""
    datasets = "\n\n".join(f"{d.name}: {d.description}" for d in DATASETS.values())
    app.command("manifest", help=manifest.__doc__, epilog=f"Datasets:\n\n{datasets}", no_args_is_help=True)(manifest)
