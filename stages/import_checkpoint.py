"""`strm import-checkpoint SRC DST`: an authors' STRM/TRX checkpoint -> the project's checkpoint format.

Released files hold the heads and the fine-tuned ResNet-50 but no QC weights; the command says
what it found, what was missing and what it dropped, so nobody mistakes TRM-only logits for STRM's.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer
from rich.console import Console

from pipeline.heads.variants import VARIANTS
from stages.common import fail


def import_checkpoint(
    src: Path = typer.Argument(
        ..., help="The authors' checkpoint (.pt/.pth): a state dict or {'model_state_dict': ...}."
    ),
    dst: Path = typer.Argument(..., help="Where to write the project-format checkpoint (heads + 'backbone')."),
    variant: str | None = typer.Option(
        None,
        "--variant",
        help=f"Heads the file holds: {', '.join(VARIANTS)} \\[default: detected, strm or trx for released files]",
    ),
) -> None:
    """Convert an authors' checkpoint; loads with weights_only (no code from the file runs).

    DST holds the heads ("model", with variant, dim and options) and, when the file has them,
    the fine-tuned backbone under "backbone", which `strm extract --backbone-checkpoint DST` reads.
    """
    from pipeline.heads import save_heads
    from pipeline.training.checkpoints import CheckpointError, load_checkpoint

    if variant is not None and variant not in VARIANTS:
        fail(f"--variant {variant!r}: expected one of {', '.join(VARIANTS)}", code=2)
    try:
        loaded = load_checkpoint(src, variant)
    except CheckpointError as err:
        fail(str(err).replace("\n", " "))
    if loaded.kind != "authors":
        fail(f"{src}: already a project checkpoint ({loaded.kind}); nothing to import", code=2)
    heads, variant = loaded.heads, loaded.variant
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

    assert loaded.recipe is not None  # load_checkpoint gives an authors' file the released models' recipe
    extra = {"source": {"path": str(src), "import_report": asdict(report)}, "recipe": loaded.recipe.to_dict()}
    if loaded.backbone_state:
        extra["backbone"] = loaded.backbone_state  # as `Backbone.state_dict()` names it
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
