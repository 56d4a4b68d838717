"""A saved support index checked field by field before it is used: an unknown, missing, mistyped or
out-of-range field is one PredictError naming the file and every bad field, never a KeyError or
TypeError from deep inside (an index may be old, hand-edited or damaged).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import torch

from pipeline.evaluation.unknown import Calibration
from pipeline.features.recipe import FeatureRecipe
from pipeline.heads import VideoEmbedding
from pipeline.predict.clips import PredictError

INDEX_FORMAT = "strm-support/1"
META_FIELDS = ("format", "actions", "used", "failed", "calibration", "checkpoint_sha256", "recipe", "weights_id")
EMBEDDING_FIELDS = ("trm_k", "trm_k_rstd", "trm_v", "qc", "qc_norms", "tuples")  # what save() writes
SHARED = ("tuples",)  # not one row per clip
_TENSOR = re.compile(r"embedding(?:\.(\w+)(?:\.(\d+))?)?")


def _keys(where: str, given: dict, cls: type) -> list[str]:
    """Unknown and missing keys of a dataclass's dict (fields with defaults may be left out)."""
    known = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    bad = [f"{where}.{k}: unknown field" for k in sorted(set(given) - known)]
    return bad + [f"{where}.{k}: missing" for k in sorted(required - set(given))]


def _numbers(value: Any, length: int | None, positive: bool = False) -> str | None:
    """Why `value` is not a list of finite numbers (of `length`, > 0 when `positive`), or None."""
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return "expected a list of numbers"
    if length is not None and len(value) != length:
        return f"{len(value)} values, expected {length} (one per action)"
    if not all(math.isfinite(v) for v in value):
        return "holds NaN or inf"
    if positive and any(v <= 0 for v in value):
        return "holds a value <= 0 (a spread must be positive)"
    return None


def _calibration(value: Any, way: int) -> list[str]:
    if not isinstance(value, dict):
        return ["calibration: expected an object"]
    bad = _keys("calibration", value, Calibration)
    t = value.get("temperature")
    if "temperature" in value and not (
        isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0
    ):
        bad.append(f"calibration.temperature: {t!r}, expected a number > 0")
    for name, positive in (("logit_mean", False), ("logit_std", True), ("qc_mean", False), ("qc_std", True)):
        if value.get(name) is not None and (why := _numbers(value[name], way, positive)):
            bad.append(f"calibration.{name}: {why}")
    for name in ("logit_mean", "logit_std"):
        if name in value and value[name] is None:
            bad.append(f"calibration.{name}: null, expected a list of numbers")
    scores = value.get("support_scores", {})
    if not isinstance(scores, dict):
        bad.append("calibration.support_scores: expected an object of score name -> numbers")
    else:
        bad += [f"calibration.support_scores.{k}: {why}" for k, v in scores.items() if (why := _numbers(v, None))]
    return bad


def _pairs(name: str, value: Any, actions: list[str] | None = None) -> list[str]:
    """[path, action or reason] rows; with `actions`, the second must be one of them."""
    if not isinstance(value, list) or not all(
        isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(x, str) for x in r) for r in value
    ):
        return [f"{name}: expected a list of [path, text] pairs"]
    if actions is not None:
        strays = sorted({a for _, a in value} - set(actions))
        if strays:
            return [f"{name}: action(s) {', '.join(map(repr, strays))} not in actions"]
    return []


def _meta(meta: dict) -> list[str]:
    bad = [f"{k}: unknown field" for k in sorted(set(meta) - set(META_FIELDS))]
    bad += [f"{k}: missing" for k in META_FIELDS if k not in meta]
    actions = meta.get("actions")
    if "actions" in meta and not (
        isinstance(actions, list) and len(actions) >= 2 and all(isinstance(a, str) and a for a in actions)
    ):
        bad.append("actions: expected a list of at least 2 action names")
        actions = None
    elif actions is not None and len(set(actions)) != len(actions):
        bad.append("actions: names repeat")
    for name in ("checkpoint_sha256", "weights_id"):
        if name in meta and not isinstance(meta[name], str):
            bad.append(f"{name}: expected text")
    if "used" in meta:
        bad += _pairs("used", meta["used"], actions)
    if "failed" in meta:
        bad += _pairs("failed", meta["failed"])
    if "recipe" in meta:
        recipe = meta["recipe"]
        bad += _keys("recipe", recipe, FeatureRecipe) if isinstance(recipe, dict) else ["recipe: expected an object"]
    if "calibration" in meta and actions is not None:
        bad += _calibration(meta["calibration"], len(actions))
    return bad


def _tensors(tensors: dict[str, torch.Tensor], clips: int, way: int) -> list[str]:
    bad = []
    labels = tensors.get("labels")
    if labels is None:
        bad.append("tensor labels: missing")
    elif labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        bad.append(f"tensor labels: {labels.dtype} {list(labels.shape)}, expected integers [clips]")
    elif len(labels) != clips:
        bad.append(f"tensor labels: {len(labels)} labels for {clips} used clips")
    elif len(stray := labels[(labels < 0) | (labels >= way)]):
        bad.append(f"tensor labels: value {int(stray[0])} out of range 0..{way - 1} (one per action)")
    elif missing := [a for a in range(way) if not (labels == a).any()]:
        bad.append(f"tensor labels: action(s) {', '.join(map(str, missing))} have no clip")
    names = [k for k in tensors if k != "labels"]
    if not names:
        bad.append("tensor embedding: missing")
    for name in names:
        found = _TENSOR.fullmatch(name)
        if found is None or (found.group(1) is not None and found.group(1) not in EMBEDDING_FIELDS):
            bad.append(f"tensor {name}: unknown")
        elif not torch.is_floating_point(tensors[name]) and found.group(1) not in SHARED:
            bad.append(f"tensor {name}: {tensors[name].dtype}, expected floating point")
        elif found.group(1) not in SHARED and (tensors[name].dim() == 0 or len(tensors[name]) != clips):
            bad.append(f"tensor {name}: {list(tensors[name].shape)}, expected one row per used clip ({clips})")
        elif found.group(1) not in SHARED and not torch.isfinite(tensors[name]).all():
            bad.append(f"tensor {name}: holds NaN or inf (the features or checkpoint weights that made the index)")
    return bad


def check_index(path: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """PredictError naming `path` and every bad field (metadata and tensors), in one line; None when sound."""
    bad = _meta(meta)
    actions, used = meta.get("actions"), meta.get("used")
    if not bad and isinstance(actions, list) and isinstance(used, list):
        bad += _tensors(tensors, len(used), len(actions))
    if bad:
        raise PredictError(f"{path}: bad support index field(s): {'; '.join(bad)}")


def embedding_from(tensors: dict[str, torch.Tensor]) -> Any:
    """The saved embedding: a tensor (proto) or a VideoEmbedding rebuilt from its fields."""
    if "embedding" in tensors:
        return tensors["embedding"]
    parts: dict[str, Any] = {}
    for name in EMBEDDING_FIELDS:
        keys = sorted(
            (k for k in tensors if k.startswith(f"embedding.{name}.")), key=lambda k: int(k.rsplit(".", 1)[1])
        )
        if keys:
            parts[name] = tuple(tensors[k] for k in keys)
        elif f"embedding.{name}" in tensors:
            parts[name] = tensors[f"embedding.{name}"]
    return VideoEmbedding(**{k: parts.get(k, ()) for k in EMBEDDING_FIELDS})


def read_index(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A saved index's metadata and tensors, checked (PredictError naming the file and what is wrong)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("strm", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same error to the user
        raise PredictError(f"{path}: not a support index ({type(err).__name__}: {err})") from None
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise PredictError(f"{path}: not a support index (format {found!r}, expected {INDEX_FORMAT!r})")
    check_index(path, meta, tensors)
    return meta, tensors


def index_summary(path: Path) -> dict:
    """What a support index holds, for `strm info`: its actions and clips, the checkpoint, recipe and
    weights it belongs to, the temperature, and the embedding's kind and tensors."""
    meta, tensors = read_index(path)
    clips = Counter(action for _, action in meta["used"])
    recipe = meta["recipe"]
    return {
        "path": str(path),
        "kind": "support index",
        "format": meta["format"],
        "actions": {a: clips[a] for a in meta["actions"]},
        "clips": len(meta["used"]),
        "failed": [f"{p}: {r}" for p, r in meta["failed"]],
        "checkpoint_sha256": meta["checkpoint_sha256"],
        "recipe": {
            k: recipe[k] for k in ("backbone", "layer", "crop", "frames", "patches", "precision") if k in recipe
        },
        "weights_id": meta["weights_id"],
        "temperature": meta["calibration"].get("temperature"),
        "embedding": "proto (class means of backbone features)" if "embedding" in tensors else "heads (VideoEmbedding)",
        "tensors": {k: list(v.shape) for k, v in sorted(tensors.items())},
    }
