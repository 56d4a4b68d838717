"""Which cache a path means: a cache's own folder, or a dataset's folder (`cache/mysports`) holding one
cache, or several, each listed in a line (recipe, videos, date) read from its metadata alone.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from pipeline.features.readers import CacheError


def cache_folder(path: Path) -> Path:
    """`path` itself when it is a cache; the one cache in a dataset's folder; else CacheError listing them."""
    if (path / "zarr.json").exists():
        return path
    found = [p for p in path.iterdir() if (p / "zarr.json").exists()] if path.is_dir() else []
    if len(found) == 1:
        return found[0]
    if found:
        listed = "; ".join(describe(p) for p in sorted(found, key=_updated, reverse=True))
        raise CacheError(f"{path}: holds {len(found)} caches, pass one of them (newest first): {listed}")
    raise CacheError(f"{path}: not a feature cache (no zarr.json); build one with `strm extract`")


def _attributes(path: Path) -> dict:
    try:
        return dict(json.loads(path.read_text()).get("attributes", {}))
    except (OSError, ValueError):
        return {}


def _updated(path: Path) -> str:
    """When the cache last took a manifest (the folder's time for caches that do not record it)."""
    updated = _attributes(path / "zarr.json").get("updated")
    return str(updated or datetime.fromtimestamp((path / "zarr.json").stat().st_mtime, timezone.utc).isoformat())


def describe(path: Path) -> str:
    """One cache in a line: its path, recipe, videos stored and date."""
    attrs = _attributes(path / "zarr.json")
    if attrs.get("schema") == 1:
        return f"{path} (schema 1, keyed by its manifest: extract again)"
    fp = attrs.get("fingerprint", {})
    recipe = ", ".join(str(fp[k]) for k in ("backbone", "layer") if k in fp) or "no recipe"
    if "crop" in fp:
        recipe += f", {fp['crop']} px, {fp.get('train_views')} views"
    videos = len(_attributes(path / "videos" / "zarr.json").get("ids", []))
    return f"{path} ({recipe}; {videos} videos; {_updated(path)[:16].replace('T', ' ')})"
