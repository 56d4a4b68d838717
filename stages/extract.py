"""Placeholder until its issue lands: registers nothing."""
import typer


def register(app: typer.Typer) -> None:
    """Add this stage's command(s) to the app."""
