"""`strm import-checkpoint SRC DST`: an authors' STRM/TRX checkpoint -> the project's checkpoint format.

Released files hold the heads and the fine-tuned ResNet-50 but no QC weights; the command says
what it found, what was missing and what it dropped, so nobody mistakes TRM-only logits for STRM's.
"""
from __future__ import annotations

import pickle
from dataclasses import asdict
from pathlib import Path

import typer
from rich.console import Console

from pipeline.heads import VARIANTS, load_authors_checkpoint, save_heads
from pipeline.heads.checkpoint import trunk_state
from stages.common import fail


def import_checkpoint(
    src: Path = typer.Argument(..., help="The authors' checkpoint (.pt/.pth): a state dict or {'model_state_dict': ...}."),
    dst: Path = typer.Argument(..., help="Where to write the project-format checkpoint (heads + 'backbone')."),
    variant: str = typer.Option("strm", "--variant", help=f"Heads the file holds: {', '.join(VARIANTS)} (released files: strm or trx)."),
) -> None:
    """Convert an authors' checkpoint; loads with weights_only (no code from the file runs).

    DST holds the heads ("model", with variant, dim and options) and, when the file has them,
    the fine-tuned backbone under "backbone", which `strm extract --backbone-checkpoint DST` reads.
    """
    if variant not in VARIANTS:
        fail(f"--variant {variant!r}: expected one of {', '.join(VARIANTS)}", code=2)
    if not src.is_file():
        fail(f"{src}: no such file")
    try:
        heads = load_authors_checkpoint(src, variant)
    except (ValueError, RuntimeError, OSError, pickle.UnpicklingError) as err:
        fail(f"{src}: {err}".replace("\n", " "))
    report = heads.import_report
    console = Console()
    sizes = ", ".join(f"{k}={v}" for k, v in report.sizes.items())
    console.print(f"[bold]{src}[/bold]: variant {variant}, {sizes}")
    for line in report.found:
        console.print(f"  [green]found[/green]    {line}")
    for line in report.missing:
        console.print(f"  [yellow]missing[/yellow]  {line}")
    for line in report.ignored:
        console.print(f"  [dim]dropped[/dim]  {line}")
    for line in report.notes:
        console.print(f"  [yellow]note[/yellow]     {line}")

    extra = {"source": {"path": str(src), "import_report": asdict(report)}}
    if heads.backbone_state_dict:
        extra["backbone"] = trunk_state(heads.backbone_state_dict)  # as `Backbone.state_dict()` names it
    try:
        save_heads(dst, heads, **extra)
    except OSError as err:
        fail(f"{dst}: cannot write: {err.strerror or err}")
    console.print(f"wrote {dst}")


def register(app: typer.Typer) -> None:
    """Add `strm import-checkpoint`."""
    app.command("import-checkpoint", help="Convert an authors' STRM/TRX checkpoint to the project format.")(
        import_checkpoint
    )
