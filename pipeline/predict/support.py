"""The support set: a few clips per action, embedded once by the heads, saved as a safetensors index
(loading never runs code) that records the checkpoint, recipe and backbone weights it belongs to.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from pipeline.evaluation.unknown import (
    Calibration,
)
from pipeline.features.recipe import FeatureRecipe
from pipeline.heads import VideoEmbedding
from pipeline.predict.clips import PredictError
from pipeline.predict.index import EMBEDDING_FIELDS, INDEX_FORMAT, embedding_from, read_index

# ---------------------------------------------------------------------------------------------- the support set


@dataclass
class HeldOut:
    """The support's own leave-one-out: each clip whose action has another clip, classified against all
    the others. Its accuracy says whether the model tells these actions apart at all."""

    held_out: int
    correct: int
    way: int

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.held_out if self.held_out else None

    @property
    def chance(self) -> float:
        return 1 / self.way

    def near_chance(self) -> bool:
        """Not clearly above guessing: below twice chance (or halfway from chance to all right, for 2 or 3
        actions), or a count that guessing gives at least 5% of the time (one-sided binomial test)."""
        if not self.held_out:
            return False
        accuracy, chance = self.correct / self.held_out, self.chance
        tail = sum(
            math.comb(self.held_out, k) * chance**k * (1 - chance) ** (self.held_out - k)
            for k in range(self.correct, self.held_out + 1)
        )
        return accuracy < min(2 * chance, (1 + chance) / 2) or tail >= 0.05

    def to_dict(self) -> dict:
        return {
            "held_out": self.held_out,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "chance": self.chance,
            "near_chance": self.near_chance(),
        }

    def sentence(self) -> str:
        """One line for a person: the accuracy against chance, and a warning when it is near chance."""
        if not self.held_out:
            return "support leave-one-out accuracy: none (no action has 2 clips to hold one out)"
        text = (
            f"support leave-one-out accuracy: {self.correct}/{self.held_out} ({100 * self.correct / self.held_out:.0f}%; "
            f"chance {100 * self.chance:.0f}%)"
        )
        if self.near_chance():
            text += (
                ": WARNING near chance, this model barely tells these actions apart, so its predictions "
                "are close to guesses (try another checkpoint or backbone, or clearer or more support clips)"
            )
        return text


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
    weights_id: str  # the backbone weights the clips went through (may differ from the recipe's: --allow-other-weights)
    held_out: HeldOut | None = None  # the leave-one-out accuracy (not saved: computed again on loading)
    ignored: list[str] = field(default_factory=list)  # hidden and tool folders skipped in the support folder
    repeated: dict[str, int] = field(default_factory=dict)  # clip -> its frames, for clips of fewer than L

    def save(self, path: Path) -> Path:
        """A safetensors file: the embeddings as tensors, everything else as JSON metadata."""
        from safetensors.torch import save_file

        tensors = {"labels": self.labels.contiguous()}
        if isinstance(self.embedding, torch.Tensor):
            tensors["embedding"] = self.embedding.contiguous()
        else:
            for f in fields(VideoEmbedding):
                if f.name not in EMBEDDING_FIELDS:
                    continue
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
        """A saved index, refused (naming the difference) when made with another checkpoint, recipe or
        weights, and (naming the file and every bad field) when a field is unknown, missing or out of range."""
        meta, tensors = read_index(path)
        if meta["checkpoint_sha256"] != checkpoint_sha256:
            raise PredictError(
                f"{path}: made with another checkpoint (sha256 {meta['checkpoint_sha256'][:12]}, this "
                f"one is {checkpoint_sha256[:12]}): save the support again with this checkpoint"
            )
        try:
            saved = FeatureRecipe.from_dict(meta["recipe"])
            calibration = Calibration.from_dict(meta["calibration"])
        except (TypeError, ValueError) as err:
            raise PredictError(f"{path}: bad support index field(s): recipe or calibration: {err}") from None
        names = [f.name for f in fields(FeatureRecipe)]
        differ = saved.differences(recipe, names)
        if differ:
            raise PredictError(f"{path}: made with another feature recipe ({'; '.join(differ)}: index vs checkpoint)")
        if meta["weights_id"] != weights_id:
            raise PredictError(
                f"{path}: made with other backbone weights ({meta['weights_id'][:16]}, these are "
                f"{weights_id[:16]}): save the support again with these weights"
            )
        return cls(
            meta["actions"],
            tensors["labels"].long(),
            embedding_from(tensors),
            [(str(p), str(a)) for p, a in meta["used"]],
            [(str(p), str(r)) for p, r in meta["failed"]],
            calibration,
            checkpoint_sha256,
            saved,
            weights_id,
        )
