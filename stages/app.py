"""The `strm` Typer app: one sub-command per stage, each registered by its own module."""

from __future__ import annotations

import functools
import importlib
import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

# OpenMP threads that spin-wait between torch's many small operations cost up to 5x on a shared
# 2-core CPU (one STRM training task: 2.8 s -> 0.5 s); it only works when set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer

from stages.common import command_line, interrupted_line

app = typer.Typer(
    name="strm",
    help=(
        "Few-shot action recognition with STRM on cached features.\n\n"
        "Typical flow: synth or manifest -> extract -> train-heads -> evaluate -> predict on your own clips "
        "(finetune is the optional end-to-end stage)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

# Order here is the order `strm --help` lists them.
STAGES = (
    "synth",
    "manifest",
    "extract",
    "cache_cmd",
    "info",
    "train_heads",
    "evaluate",
    "compare",
    "predict",
    "finetune",
    "import_checkpoint",
    "visualize",
    "ablate",
    "heads_info",
    "backbones",
    "demo",
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"strm {version('strm')}")
        except PackageNotFoundError:
            typer.echo("strm (not installed: run from a checkout)")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_version, help="Print the version and exit."
    ),
) -> None:
    """Few-shot action recognition with STRM on cached features."""


def _interruptible(command: Callable[..., Any]) -> Callable[..., Any]:
    """The command, ending on Ctrl-C or SIGTERM with one line (what was saved, how to go on) and exit
    code 130 instead of a traceback or click's bare "Aborted!"."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            typer.echo(interrupted_line(command_line()), err=True)
            raise typer.Exit(130) from None

    return run


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM (a scheduler, `kill`) stops a stage the way Ctrl-C does: files closed, workers stopped."""
    raise KeyboardInterrupt


for _name in STAGES:
    importlib.import_module(f"stages.{_name}").register(app)
for _command in app.registered_commands:
    if _command.callback is not None:
        _command.callback = _interruptible(_command.callback)


def main() -> None:
    """Console-script entry point."""
    signal.signal(signal.SIGTERM, _terminate)
    app()


if __name__ == "__main__":
    main()
