"""Videos before any model: manifests (datasets, splits, validation), decoding and the sampling rule
with its views, the embedded synthetic benchmark, and seeded episodes over class labels.
"""

from pipeline.data.episodes import EpisodeSampler, Task, TaskBatch
from pipeline.data.manifests import (
    DATASETS,
    VIDEO_SUFFIXES,
    ManifestError,
    build_manifest,
    read_manifest,
    validate_manifest,
    write_manifest,
)
from pipeline.data.synth import write_mp4
from pipeline.data.video import (
    FRAMES,
    SAMPLING_RULE_VERSION,
    VideoError,
    ViewSpec,
    count_frames,
    decode_frames,
    load_view,
    load_views,
    sample_indices,
)

__all__ = [
    "DATASETS",
    "EpisodeSampler",
    "FRAMES",
    "ManifestError",
    "SAMPLING_RULE_VERSION",
    "Task",
    "TaskBatch",
    "VIDEO_SUFFIXES",
    "VideoError",
    "ViewSpec",
    "build_manifest",
    "count_frames",
    "decode_frames",
    "load_view",
    "load_views",
    "read_manifest",
    "sample_indices",
    "validate_manifest",
    "write_manifest",
    "write_mp4",
]
