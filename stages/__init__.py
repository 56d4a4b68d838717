"""The `strm` command: Typer stages that talk to the user and call `pipeline`."""
