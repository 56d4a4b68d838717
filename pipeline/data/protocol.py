"""The data protocol as plain data (STRM_SPEC section 10): L frames a video, the splits, the datasets and
their published split sizes. Nothing here imports torch or pandas: a command's --help reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FRAMES = 8  # L: frames per video (STRM_SPEC section 10)
SPLITS = ("train", "val", "test")
DATA_MANIFESTS = Path(__file__).resolve().parents[2] / "data_manifests"

# Videos per split (train, val, test) in the published splits (STRM_SPEC section 10).
OFFICIAL_COUNTS: dict[str, tuple[int, int, int]] = {
    "hmdb51": (4280, 1194, 1292),
    "ucf101": (9154, 1421, 2745),
    "kinetics100": (6400, 1200, 2400),
    "ssv2_otam": (67013, 1926, 2857),
    "ssv2_cmn": (6400, 1200, 2400),
}


@dataclass(frozen=True)
class Dataset:
    """How a dataset's split is defined: a bundled class-level CSV, or lists the user passes."""

    name: str
    description: str
    classes_csv: Path | None = None  # bundled class -> split table
    needs: str | None = None  # "split_dir" or "classes_csv" when the user must give it


DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset("hmdb51", "HMDB51, ARN split 31/10/10 classes (every video of a class)", DATA_MANIFESTS / "hmdb51.csv"),
        Dataset("ucf101", "UCF101, ARN split 70/10/21 classes (every video of a class)", DATA_MANIFESTS / "ucf101.csv"),
        Dataset("kinetics100", "Kinetics-100, CMN lists class/video_id (--split-dir)", needs="split_dir"),
        Dataset("ssv2", "Something-Something v2, OTAM (train8/78687) or CMN lists (--split-dir)", needs="split_dir"),
        Dataset("synthetic", "the synthetic benchmark of `strm synth`", DATA_MANIFESTS / "synthetic.csv"),
        Dataset("folder", "your videos, one folder per class, with a class,split CSV (--classes)", needs="classes_csv"),
    )
}
