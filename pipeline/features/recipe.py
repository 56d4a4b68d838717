"""The feature recipe: everything that decides what a cached feature means (backbone and its weights, input
geometry, normalisation, L, P, views, sampling rule, precision, stored dtype), built and parsed here
and nowhere else. Its fingerprint names the cache's store of videos (store_key: a video's features
depend on the recipe and its file, never on the manifest that lists it), a checkpoint records it with
the manifest's part, and a stage that turns new clips into features for a checkpoint rebuilds exactly
those features from it alone.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields

from pipeline.data.video import ViewSpec
from pipeline.features.readers import (
    CacheError,
)

STORED_DTYPE = "float16"


# The fingerprint's fields that say which videos a manifest selects, not what a video's features are.
SELECTION_FIELDS = ("dataset", "manifest", "videos")


def cache_key(fingerprint: dict) -> str:
    """Short, stable hash of a readable record (a fingerprint or a part of it)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]


def split_fingerprint(fingerprint: dict) -> tuple[dict, dict]:
    """(the store's part: what decides a video's features, the selection's part: SELECTION_FIELDS)."""
    store = {k: v for k, v in fingerprint.items() if k not in SELECTION_FIELDS}
    return store, {k: v for k, v in fingerprint.items() if k in SELECTION_FIELDS}


def store_key(fingerprint: dict) -> str:
    """The key of the store a fingerprint's videos live in: its recipe's hash, whatever the manifest."""
    return cache_key(split_fingerprint(fingerprint)[0])


def fingerprint_diff(expected: dict, found: dict) -> list[str]:
    """Readable list of the fields that differ between two fingerprints."""
    keys = sorted(set(expected) | set(found))
    return [
        f"{k}: {found.get(k)!r} in the cache, {expected.get(k)!r} asked"
        for k in keys
        if expected.get(k) != found.get(k)
    ]


def manifest_digest(rows: Iterable[tuple[str, str, str, str]]) -> str:
    """sha256 of (split, class, video_id, path) rows: the manifest's part of the fingerprint."""
    h = hashlib.sha256()
    for row in sorted(rows):
        h.update("\t".join(row).encode() + b"\n")
    return h.hexdigest()


# The recipe's fields that decide what a feature means: heads trained on one recipe do not fit
# features of a recipe that differs in any of them (views, seeds and the manifest only change which
# training views exist, not what a test view's feature is).
FEATURE_FIELDS = (
    "backbone",
    "layer",
    "weights",
    "short_side",
    "crop",
    "interpolation",
    "mean",
    "std",
    "frames",
    "patches",
    "sampling_rule",
    "precision",
    "dtype",
)
_NO_NORMALIZE = "none: [0, 1]"


@dataclass(frozen=True)
class FeatureRecipe:
    """Everything that turns a video into cached features, as one typed object.

    `weights` identifies the exact backbone weights (a file's or tensors' sha256, a fine-tuned
    checkpoint's sha256, or "random:<seed>:<hash>"); mean and std are None for the authors' raw
    [0, 1] pixels; `patches` is P (the map is max-pooled to P x P).
    """

    backbone: str
    layer: str
    weights: str
    short_side: int
    crop: int
    flip: bool
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    frames: int
    patches: int
    train_views: int
    view_seed: int
    sampling_rule: str
    precision: str
    dtype: str = STORED_DTYPE
    interpolation: str = "bilinear"

    @property
    def normalize(self) -> bool:
        return self.mean is not None

    def fingerprint(self, dataset: str, manifest: str, videos: int) -> dict:
        """The readable record of a cache: the recipe (whose hash, `store_key`, names the store) and the manifest."""
        normalize = _NO_NORMALIZE
        if self.normalize:
            assert self.mean is not None and self.std is not None  # normalize: mean given; std comes with it
            normalize = f"mean={list(self.mean)} std={list(self.std)}"
        fp = {
            "dataset": dataset,
            "manifest": manifest,
            "videos": int(videos),
            "backbone": self.backbone,
            "layer": self.layer,
            "weights": self.weights,
            "short_side": self.short_side,
            "crop": self.crop,
            "flip": self.flip,
            "normalize": normalize,
            "frames": self.frames,
            "patches": self.patches,
            "train_views": self.train_views,
            "view_seed": self.view_seed,
            "sampling_rule": self.sampling_rule,
            "precision": self.precision,
            "dtype": self.dtype,
        }
        if self.interpolation != "bilinear":  # recorded only where it differs: older caches keep their keys
            fp["interpolation"] = self.interpolation
        return fp

    @classmethod
    def from_fingerprint(cls, fp: dict) -> FeatureRecipe | None:
        """The recipe a cache fingerprint records; None for caches not made from videos (random test caches)."""
        if not isinstance(fp, dict) or "backbone" not in fp or "normalize" not in fp:
            return None
        mean = std = None
        normalize = str(fp["normalize"])
        if normalize != _NO_NORMALIZE:
            found = re.fullmatch(r"mean=(\[[^\]]*\]) std=(\[[^\]]*\])", normalize)
            if found is None:
                raise CacheError(f"fingerprint field normalize {normalize!r} is not mean=[...] std=[...]")
            mean, std = tuple(json.loads(found.group(1))), tuple(json.loads(found.group(2)))
        known = {f.name for f in fields(cls)} - {"mean", "std"}
        return cls(mean=mean, std=std, **{k: v for k, v in fp.items() if k in known})

    def differences(self, other: FeatureRecipe, names: Iterable[str] = FEATURE_FIELDS) -> list[str]:
        """`name: mine vs other` for each field (of `names`) that differs."""
        return [
            f"{k}: {getattr(self, k)!r} vs {getattr(other, k)!r}"
            for k in names
            if getattr(self, k) != getattr(other, k)
        ]

    def view_spec(self) -> ViewSpec:
        """The pixel geometry of this recipe's views (pipeline.video)."""
        return ViewSpec(short_side=self.short_side, crop=self.crop, flip=self.flip, interpolation=self.interpolation)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FeatureRecipe:
        values = dict(d)
        for key in ("mean", "std"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)
