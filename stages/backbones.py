"""`strm backbones`: the backbones `--backbone` takes by name, with their D, input size and weights."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def backbones_command() -> None:
    """List the registered backbones and the presets: default layer, feature width D, input crop and
    where the weights come from. Any other timm model name works too (`strm extract --backbone NAME`)."""
    from pipeline.features.backbones import backbone_rows

    table = Table("name", "layer", "D", "crop", "weights")
    for row in backbone_rows():
        table.add_row(*(str(row[k]) for k in ("name", "layer", "dim", "crop", "weights")))
    console.print(table)
    console.print(
        "torchvision's and timm's weights are downloaded on first use; offline, pass --weights FILE. "
        "Any other timm model name works too, and --layer picks another feature level (strm extract --help)."
    )


def register(app: typer.Typer) -> None:
    """Add `strm backbones` to the app."""
    app.command("backbones", help=backbones_command.__doc__)(backbones_command)
