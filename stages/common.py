"""What every stage shares: one-line errors on stderr and the exit code that goes with them."""
from __future__ import annotations

from typing import NoReturn

import typer


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: message` as one line on stderr (no wrapping) and stop with `code`."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)
