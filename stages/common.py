"""What every stage shares: one-line errors on stderr, and loading heads from any checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import torch
import typer

from pipeline.heads import VARIANTS, load_authors_checkpoint, load_heads


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: message` as one line on stderr (no wrapping) and stop with `code`."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def load_model(checkpoint: Path, variant: str | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Heads from a project checkpoint or, detected by its keys, an authors' file (via the importer)."""
    try:
        raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a file that is not a checkpoint
        fail(f"{checkpoint}: not a readable checkpoint ({type(err).__name__}: {str(err).splitlines()[0]})")
    if not isinstance(raw, dict):
        fail(f"{checkpoint}: holds a {type(raw).__name__}, not a checkpoint dict")
    if "format" in raw:
        try:
            heads, saved = load_heads(raw)
        except (ValueError, KeyError, RuntimeError) as err:
            fail(f"{checkpoint}: {err}")
        about = {"checkpoint": str(checkpoint), "checkpoint_format": saved["format"], "variant": saved["variant"]}
        if "cache_fingerprint" in saved:
            about["trained_on_cache"] = saved["cache_fingerprint"]
        return heads, about
    # An authors' file has no format tag. Its variant is the first whose weights it holds exactly and
    # whose cardinalities it has (the importer reads them from the tensors, so trm loads a TRX file too).
    errors, loaded = [], []
    for name in [variant] if variant else list(VARIANTS):
        try:
            heads = load_authors_checkpoint(raw, variant=name)
        except ValueError as err:
            errors.append(f"{name}: {err}")
            continue
        if variant or tuple(VARIANTS[name]["cardinalities"]) == tuple(heads.cardinalities):
            loaded.insert(0, (name, heads))
            break
        loaded.append((name, heads))
    if not loaded:
        fail(f"{checkpoint}: not a project checkpoint and not an authors' one ({'; '.join(errors)})")
    name, heads = loaded[0]
    note = "" if heads.has_qc else "the file has no QC weights: logits are the TRM logits alone"
    return heads, {"checkpoint": str(checkpoint), "checkpoint_format": "authors", "variant": name, "note": note}
