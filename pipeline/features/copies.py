"""Copies of a cache for other uses: an HDF5 export for tools that do not read Zarr, and a cache of
random features made in seconds for tests and benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.features.cache import CacheWriter, FeatureCache, SplitLayout


def export_hdf5(cache: FeatureCache, out: Path | str) -> Path:
    """Write the cache's arrays and attributes to one HDF5 file, for tools that read HDF5."""
    import h5py

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(out, "w") as f:
        f.attrs["fingerprint"] = json.dumps(cache.fingerprint, sort_keys=True)
        f.attrs["key"] = cache.key
        for split in cache.splits:
            g = f.create_group(split)
            array, views = cache.features_array(split), cache.views(split)
            slots, done = cache.slots(split), cache.done(split)
            shape = (views, *array.shape[2:])
            dset = g.create_dataset("features", shape=(len(slots), *shape), dtype="float16", chunks=(1, *shape))
            for i in np.flatnonzero(done):  # one video at a time: a split may not fit in RAM
                dset[i] = array[slots[i], :views]
            g.create_dataset("labels", data=cache.labels(split))
            g.create_dataset("done", data=cache.done(split))
            g.create_dataset(
                "video_ids", data=np.array(cache.video_ids(split), dtype=object), dtype=h5py.string_dtype()
            )
            g.attrs["class_names"] = json.dumps(cache.class_names(split))
            g.attrs["failures"] = json.dumps(cache.failures(split))
    return out


def write_random_cache(
    path: Path | str,
    *,
    splits: dict[str, tuple[int, int, int]],
    frames: int = 8,
    patches: int = 16,
    dim: int = 64,
    seed: int = 0,
    signal: float = 1.0,
) -> Path:
    """A small cache of class-structured random features, written through the real writer.

    Each class has a random [L, P*P, D] pattern; a video is its class pattern times `signal` plus
    unit noise, so heads can learn it and evaluation has something to measure. For tests and
    benchmarks; split -> (classes, videos per class, views).
    """
    rng = np.random.default_rng(seed)
    layouts, data = {}, {}
    for split, (classes, per_class, views) in splits.items():
        names = [f"{split}_class_{c:03d}" for c in range(classes)]
        labels = np.repeat(np.arange(classes), per_class)
        patterns = rng.standard_normal((classes, frames, patches, dim)).astype(np.float32)
        noise = rng.standard_normal((len(labels), views, frames, patches, dim)).astype(np.float32)
        data[split] = (signal * patterns[labels][:, None] + noise).astype(np.float16)
        layouts[split] = SplitLayout(
            video_ids=[f"{names[c]}/v{i:04d}" for i, c in enumerate(labels)],
            labels=labels.tolist(),
            class_names=names,
            views=views,
        )
    fingerprint = {
        "dataset": "random",
        "seed": seed,
        "signal": signal,
        "splits": {s: list(v) for s, v in splits.items()},
    }
    writer = CacheWriter.create(path, fingerprint, layouts, frames=frames, patches=patches, dim=dim)
    for split, features in data.items():
        writer.write_split(split, features)
    return Path(path)
