from .episodes import EpisodeSampler, Task, TaskBatch
from .manifests import (
    VIDEO_SUFFIXES,
    ManifestError,
    build_manifest,
    read_manifest,
    validate_manifest,
    write_manifest,
)
from .protocol import DATASETS, FRAMES
from .synth import write_mp4
from .video import (
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
