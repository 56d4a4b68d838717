"""The support set: a few clips per action, embedded once by the heads, saved as a safetensors index
(loading never runs code) that records the checkpoint, recipe and backbone weights it belongs to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from pipeline.evaluation.unknown import (
    Calibration,
)
from pipeline.features.cache import FeatureRecipe
from pipeline.heads import VideoEmbedding
from pipeline.predict.clips import PredictError

INDEX_FORMAT = "strm-support/1"


# ---------------------------------------------------------------------------------------------- the support set


@dataclass
class SupportSet:
    """The support clips' per-video embeddings, their actions, and the leave-one-out calibration."""

    actions: list[str]
    labels: torch.Tensor  # [n] action index of each used clip
    embedding: Any  # VideoEmbedding [n] (heads) or a tensor [n, L*D] (proto)
    used: list[tuple[str, str]]  # (path, action)
    failed: list[tuple[str, str]]  # (path, reason)
    calibration: Calibration
    checkpoint_sha256: str
    recipe: FeatureRecipe
    weights_id: (
        str  # the backbone weights the clips went through (may differ from the recipe's with --allow-other-weights)
    )

    def save(self, path: Path) -> Path:
        """A safetensors file: the embeddings as tensors, everything else as JSON metadata."""
        from safetensors.torch import save_file

        tensors = {"labels": self.labels.contiguous()}
        if isinstance(self.embedding, torch.Tensor):
            tensors["embedding"] = self.embedding.contiguous()
        else:
            for f in fields(VideoEmbedding):
                value = getattr(self.embedding, f.name)
                if isinstance(value, tuple):
                    tensors.update({f"embedding.{f.name}.{i}": t.contiguous() for i, t in enumerate(value)})
                elif value is not None:
                    tensors[f"embedding.{f.name}"] = value.contiguous()
        meta = {
            "format": INDEX_FORMAT,
            "actions": self.actions,
            "used": self.used,
            "failed": self.failed,
            "calibration": self.calibration.to_dict(),
            "checkpoint_sha256": self.checkpoint_sha256,
            "recipe": self.recipe.to_dict(),
            "weights_id": self.weights_id,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.cpu() for k, v in tensors.items()}, str(path), metadata={"strm": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: Path, checkpoint_sha256: str, recipe: FeatureRecipe, weights_id: str) -> SupportSet:
        """A saved index, refused (naming the difference) when made with another checkpoint, recipe or weights."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("strm", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same error to the user
            raise PredictError(f"{path}: not a support index ({type(err).__name__}: {err})") from None
        if meta.get("format") != INDEX_FORMAT:
            raise PredictError(
                f"{path}: not a support index (format {meta.get('format')!r}, expected {INDEX_FORMAT!r})"
            )
        if meta["checkpoint_sha256"] != checkpoint_sha256:
            raise PredictError(
                f"{path}: made with another checkpoint (sha256 {meta['checkpoint_sha256'][:12]}, this "
                f"one is {checkpoint_sha256[:12]}): save the support again with this checkpoint"
            )
        saved = FeatureRecipe.from_dict(meta["recipe"])
        names = [f.name for f in fields(FeatureRecipe)]
        differ = saved.differences(recipe, names)
        if differ:
            raise PredictError(f"{path}: made with another feature recipe ({'; '.join(differ)}: index vs checkpoint)")
        if meta["weights_id"] != weights_id:
            raise PredictError(
                f"{path}: made with other backbone weights ({meta['weights_id'][:16]}, these are "
                f"{weights_id[:16]}): save the support again with these weights"
            )
        if "embedding" in tensors:
            embedding: Any = tensors["embedding"]
        else:
            parts: dict[str, Any] = {}
            for f in fields(VideoEmbedding):
                keys = sorted(
                    (k for k in tensors if k.startswith(f"embedding.{f.name}.")), key=lambda k: int(k.rsplit(".", 1)[1])
                )
                if keys:
                    parts[f.name] = tuple(tensors[k] for k in keys)
                elif f"embedding.{f.name}" in tensors:
                    parts[f.name] = tensors[f"embedding.{f.name}"]
            embedding = VideoEmbedding(
                **{k: parts.get(k, ()) for k in ("trm_k", "trm_k_rstd", "trm_v", "qc", "qc_norms", "tuples")}
            )
        return cls(
            meta["actions"],
            tensors["labels"],
            embedding,
            [tuple(x) for x in meta["used"]],
            [tuple(x) for x in meta["failed"]],
            Calibration.from_dict(meta["calibration"]),
            checkpoint_sha256,
            saved,
            weights_id,
        )
