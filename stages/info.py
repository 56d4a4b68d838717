"""`strm info PATH`: what a checkpoint, a feature cache or a support index holds, without reading code or JSON."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from stages.common import fail


def _lines(summary: dict, indent: str = "") -> list[str]:
    out = []
    for key, value in summary.items():
        if isinstance(value, dict) and value:
            out += [f"{indent}{key}:", *_lines(value, indent + "  ")]
        elif isinstance(value, list) and len(value) > 12:
            out.append(f"{indent}{key}: {len(value)}: {', '.join(map(str, value[:12]))}, ...")
        else:
            out.append(f"{indent}{key}: {', '.join(map(str, value)) if isinstance(value, list) else value}")
    return out


def info_command(
    path: Path = typer.Argument(
        ...,
        help="A checkpoint (train-heads, finetune, authors'), a cache folder (or a dataset's: cache/NAME), "
        "or a support index (.safetensors from `strm predict --save-support`).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print it as JSON."),
) -> None:
    """A checkpoint: kind, variant, D, parameters, the features it was trained on, the training
    split's classes, tasks trained, best validation. A cache: its recipe, and per split the classes
    and the videos done, failed and pending. A support index: its actions and clips per action, the
    checkpoint, recipe and weights it belongs to, the temperature and its tensors."""
    from pipeline.features.cache import open_cache
    from pipeline.features.readers import CacheError
    from pipeline.predict.clips import PredictError
    from pipeline.predict.index import index_summary
    from pipeline.training.checkpoints import CheckpointError, load_checkpoint

    if not path.exists():
        fail(f"{path}: no such checkpoint or cache", 2)
    try:
        if path.is_dir():
            cache = open_cache(path)
            summary = cache.summary()
            for split in cache.splits:
                summary["splits"][split]["class_names"] = cache.class_names(split)
        elif path.suffix == ".safetensors":
            summary = index_summary(path)
        else:
            summary = load_checkpoint(path).summary()
    except (CacheError, CheckpointError, PredictError) as err:
        fail(str(err))
    typer.echo(json.dumps(summary, indent=2, default=str) if as_json else "\n".join(_lines(summary)))


def register(app: typer.Typer) -> None:
    """Add `strm info` to the app."""
    app.command("info", help=info_command.__doc__)(info_command)
