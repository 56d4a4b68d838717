"""`strm cache info|export`: look inside a feature cache, or hand it to HDF5 tools."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from stages.common import fail

cache_app = typer.Typer(help="Inspect or export a feature cache built by `strm extract`.", no_args_is_help=True)
console = Console()


class ExportFormat(str, Enum):
    hdf5 = "hdf5"


def _open(path: Path):
    from pipeline.features.cache import open_cache
    from pipeline.features.readers import CacheError

    try:
        return open_cache(path)
    except CacheError as err:
        fail(str(err))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@cache_app.command("info")
def info(
    path: Path = typer.Argument(..., help="Cache folder, e.g. cache/hmdb51/<key> (or cache/hmdb51 when it holds one)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Counts per split (done, failed with reasons, pending), the videos stored, the fingerprint and the size on disk."""
    summary = _open(path).summary()
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    shape = summary["shape"]
    console.print(
        f"[bold]{summary['path']}[/bold]  key {summary['key']}  "
        f"L={shape['frames']} patches={shape['patches']} D={shape['dim']} {shape['dtype']}  "
        f"{_human(summary['bytes_on_disk'])} on disk"
    )
    store = summary["store"]
    console.print(
        f"stored: {store['videos']} videos ({store['not_in_this_manifest']} not in the current manifest), "
        f"updated {summary['updated']}",
        highlight=False,
    )
    table = Table("split", "videos", "done", "failed", "pending", "views", "classes")
    for split, s in summary["splits"].items():
        table.add_row(split, *(str(s[k]) for k in ("videos", "done", "failed", "pending", "views", "classes")))
    console.print(table)
    for split, s in summary["splits"].items():
        for failure in s["failures"]:
            console.print(f"  failed [{split}] {failure['video_id']}: {failure['reason']}")
    console.print("fingerprint:")
    for key, value in summary["fingerprint"].items():
        console.print(f"  {key}: {value}")


@cache_app.command("export")
def export(
    path: Path = typer.Argument(..., help="Cache folder."),
    out: Path = typer.Argument(..., help="Output file."),
    fmt: ExportFormat = typer.Option(ExportFormat.hdf5, "--format", help="Output format."),
) -> None:
    """Write the cache's arrays (features, labels, done, video ids) and attributes to an HDF5 file."""
    from pipeline.features.copies import export_hdf5

    written = export_hdf5(_open(path), out)
    console.print(f"wrote {written} ({_human(written.stat().st_size)})")


def register(app: typer.Typer) -> None:
    """Add `strm cache` to the app."""
    app.add_typer(cache_app, name="cache")
