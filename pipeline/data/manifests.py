"""Datasets on disk -> one manifest table (video_id, class, split, path, n_frames, status), then a pre-flight check.

A split is defined either at class level (a `class,split` CSV: every video of a class is in its
class's split - the ARN splits of HMDB51 and UCF101, the synthetic benchmark, a user's folder) or
by the authors' lists `class/video_id` (Kinetics-100 and SSv2 from CMN/OTAM, or any dataset given
--split-dir). Validation opens every video in worker processes, so a crashing decoder fails one
row and the check goes on; nothing here stops at the first bad file.

A dataset has a name that every later stage takes (`strm manifest folder --name mysports` writes
data_manifests/local/mysports.csv, `strm extract mysports` reads it, the cache goes to
cache/mysports/): `dataset_name` decides it and `resolve_manifest` finds a name's manifest. Names of
classes and files are compared after Unicode NFC normalisation (macOS writes folder names NFD).
"""

from __future__ import annotations

import functools
import os
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd

from pipeline.data.protocol import DATASETS, FRAMES, OFFICIAL_COUNTS, SPLITS
from pipeline.data.video import VideoError, count_frames
from pipeline.runtime import distributed
from pipeline.runtime.workers import TIME_LIMIT_S, imap_isolated

COLUMNS = ("video_id", "class", "split", "path", "n_frames", "status")
VIDEO_SUFFIXES = frozenset(
    {".avi", ".mp4", ".m4v", ".mkv", ".webm", ".mov", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp", ".ogv", ".ts"}
)
LOCAL_MANIFESTS = Path("data_manifests/local")  # where `strm manifest` writes, under the working directory
_NAME = re.compile(r"\w[\w.-]*")  # a dataset name is a folder and a file name: letters, digits, _ . -

MISSING_CLASS = "/*"  # video_id suffix of the one row saying a class of a class-level CSV has no videos
_OTAM_CLASS = re.compile(r"^(train|val|test)\d+$")  # OTAM names a class by split and index: train8


class ManifestError(ValueError):
    """A dataset definition that cannot be resolved (wrong folder, missing or malformed split file)."""


# ---------------------------------------------------------------------------------------------
# Split definitions
# ---------------------------------------------------------------------------------------------


def read_class_splits(path: Path) -> dict[str, str]:
    """A `class,split` CSV -> {class: split}; every split must be train, val or test."""
    if not Path(path).is_file():
        raise ManifestError(f"{path}: no such class,split CSV")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(table.columns[:2]) != ["class", "split"]:
        raise ManifestError(f"{path}: expected the header 'class,split', found {','.join(table.columns)}")
    bad = sorted(set(table["split"]) - set(SPLITS))
    if bad:
        raise ManifestError(f"{path}: unknown split(s) {', '.join(bad)} (use train, val, test)")
    table["class"] = table["class"].map(nfc)
    duplicated = table["class"][table["class"].duplicated()].tolist()
    if duplicated:
        raise ManifestError(f"{path}: class listed twice: {duplicated[0]}")
    return dict(zip(table["class"], table["split"], strict=False))


def write_class_splits(path: Path, classes: dict[str, str]) -> Path:
    """{class: split} -> a `class,split` CSV that read_class_splits reads back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"class": list(classes), "split": list(classes.values())}).to_csv(path, index=False)
    return path


def read_split_lists(split_dir: Path) -> list[tuple[str, str, str]]:
    """The authors' lists (trainlist*.txt, vallist*.txt, testlist*.txt; lines class/video_id) -> (video_id, class, split)."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise ManifestError(f"{split_dir}: no such split directory")
    entries: list[tuple[str, str, str]] = []
    for split in SPLITS:
        files = sorted(split_dir.glob(f"{split}list*.txt"))
        if len(files) != 1:
            found = ", ".join(f.name for f in files) or "none"
            raise ManifestError(f"{split_dir}: expected one {split}list*.txt, found {found}")
        for number, line in enumerate(files[0].read_text(encoding="utf-8").splitlines(), start=1):
            line = nfc(line.strip())
            if not line:
                continue
            if "/" not in line:
                raise ManifestError(f"{files[0]}:{number}: expected class/video_id, got {line!r}")
            cls = line.rsplit("/", 1)[0]  # SSv2 class names contain commas, never the id a slash
            entries.append((line, cls, split))
    return entries


# ---------------------------------------------------------------------------------------------
# Finding the files
# ---------------------------------------------------------------------------------------------


def nfc(name: str) -> str:
    """The one Unicode form names are compared and recorded in (macOS writes file names decomposed, NFD)."""
    return unicodedata.normalize("NFC", name)


def _norm(name: str) -> str:
    """Class folder names vary between downloads: 'air drumming', 'air_drumming', 'Air_Drumming', 'Übung' NFD."""
    return nfc(name).strip().lower().replace(" ", "_")


class _VideoIndex:
    """Every video file under a root, by (class folder, stem) and by stem alone; one walk."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.by_folder: dict[str, list[Path]] = defaultdict(list)
        self.by_stem: dict[str, list[Path]] = defaultdict(list)
        self.folders: dict[str, str] = {}  # class folders (below the root, holding videos): normalised -> name
        for folder, _, names in os.walk(root, followlinks=True):
            for name in sorted(names):
                path = Path(folder) / name
                if path.suffix.lower() in VIDEO_SUFFIXES:
                    self.by_folder[_norm(path.parent.name)].append(path)
                    self.by_stem[nfc(path.stem)].append(path)
                    if Path(folder) != root:
                        self.folders.setdefault(_norm(path.parent.name), nfc(path.parent.name))

    def find(self, cls: str, stem: str) -> tuple[Path | None, str]:
        """The file for a list entry: in a folder named like its class, else the one file with that stem."""
        stem = nfc(stem)
        candidates = self.by_stem.get(stem, [])
        in_class = [p for p in candidates if _norm(p.parent.name) == _norm(cls)]
        if in_class:
            return in_class[0], "ok"
        if len(candidates) == 1:
            return candidates[0], "ok"
        if candidates:
            return None, f"missing: {len(candidates)} files named {stem}.*, none in a folder {cls}"
        return None, f"missing: no video file {stem}.* under {self.root}"


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def build_manifest(
    dataset: str,
    videos: Path,
    split_dir: Path | None = None,
    classes_csv: Path | None = None,
) -> pd.DataFrame:
    """Resolve a dataset on disk into a manifest; unvalidated (n_frames -1), missing files flagged.

    `split_dir` (the authors' lists) defines the videos when given; otherwise a class-level CSV does:
    `classes_csv`, or the one bundled in data_manifests/ for hmdb51, ucf101 and synthetic. A class
    of the CSV with no videos on disk gets one row `<class>/*` saying so, so the report shows it.
    """
    if dataset not in DATASETS:
        raise ManifestError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    spec = DATASETS[dataset]
    videos = Path(videos)
    if not videos.is_dir():
        raise ManifestError(f"{videos}: no such videos directory")
    if spec.needs == "split_dir" and split_dir is None:
        raise ManifestError(f"{dataset} needs --split-dir: the folder of trainlist*.txt, vallist*.txt, testlist*.txt")
    if spec.needs == "classes_csv" and classes_csv is None and split_dir is None:
        raise ManifestError(f"{dataset} needs --classes: a CSV with columns class,split")
    index = _VideoIndex(videos)
    if split_dir is not None:
        rows = list(_rows_from_lists(read_split_lists(split_dir), index))
    else:
        class_csv = classes_csv or spec.classes_csv
        assert class_csv is not None  # the needs == "classes_csv" check above, or a bundled CSV
        rows = list(_rows_from_classes(read_class_splits(class_csv), index))
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    order = {split: k for k, split in enumerate(SPLITS)}
    table = table.sort_values(["split", "class", "video_id"], key=lambda c: c.map(order) if c.name == "split" else c)
    return _typed(table.reset_index(drop=True))


def _rows_from_lists(entries: list[tuple[str, str, str]], index: _VideoIndex) -> Iterator[tuple]:
    for video_id, cls, split in entries:
        path, status = index.find(cls, video_id.rsplit("/", 1)[1])
        yield video_id, cls, split, str(path.absolute()) if path else "", -1, status


def _rows_from_classes(classes: dict[str, str], index: _VideoIndex) -> Iterator[tuple]:
    for cls, split in classes.items():
        paths = index.by_folder.get(_norm(cls), [])
        if not paths:
            yield (
                f"{cls}{MISSING_CLASS}",
                cls,
                split,
                "",
                -1,
                f"missing: no folder {cls} with videos under {index.root}",
            )
        seen: set[str] = set()
        for path in paths:
            if nfc(path.stem) not in seen:  # x.avi and x.mp4 side by side: one video
                seen.add(nfc(path.stem))
                yield f"{cls}/{nfc(path.stem)}", cls, split, str(path.absolute()), -1, "ok"


def _typed(table: pd.DataFrame) -> pd.DataFrame:
    table = table.astype({"video_id": str, "class": str, "split": str, "path": str, "n_frames": "int64", "status": str})
    return table[list(COLUMNS)]


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _probe(item: tuple[int, str], min_frames: int = FRAMES) -> tuple[int, str]:
    """Worker side: (row, path) -> (n_frames, status) for one video; under `min_frames` it is too short."""
    _, path = item
    if not Path(path).exists():
        return -1, "missing: no such file"
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        return 0, "empty: 0 bytes"
    try:
        n = count_frames(path)
    except VideoError as exc:
        return -1, f"unreadable: {exc.reason}"
    if n == 0:
        return 0, "empty: no decodable frames"
    if n < min_frames:
        return n, f"too short: {n} frames (< {min_frames})"
    return n, "ok"


def validate_manifest(
    df: pd.DataFrame,
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
    *,
    timeout_s: float | None = TIME_LIMIT_S,
    min_frames: int = FRAMES,
) -> pd.DataFrame:
    """Open every video with a path and read its true frame count, in `workers` processes.

    Returns a copy with n_frames and status filled: "ok", or "missing: ...", "unreadable: ...",
    "empty: ...", "too short: ..." (fewer than `min_frames`: by default L, the authors' rule for the
    benchmarks; lower for one's own short clips, whose frames the sampling rule then repeats) (a
    decoder that crashes or runs past `timeout_s` makes its row unreadable). Rows without a path keep
    their status. `progress(k)` is called as rows finish, k rows at a time, len(df) in all.
    """
    if min_frames < 1:
        raise ValueError(f"min_frames must be at least 1 (a video needs a decodable frame), got {min_frames}")
    out = _typed(df.copy())
    rows = [(k, path) for k, path in enumerate(out["path"]) if path]
    if progress is not None and len(out) > len(rows):
        progress(len(out) - len(rows))
    if not rows:
        return out
    n_frames = out["n_frames"].to_numpy().copy()
    status = out["status"].to_numpy().copy()
    results = imap_isolated(
        functools.partial(_probe, min_frames=min_frames),
        rows,
        workers=min(workers, len(rows)),
        max_in_flight=2 * workers,
        timeout_s=timeout_s,
    )
    for (row, _), result, error in results:
        if error is None:
            assert result is not None  # an item without an error carries _probe's result
            n_frames[row], status[row] = result
        else:
            n_frames[row], status[row] = -1, f"unreadable: {error}"
        if progress is not None:
            progress(1)
    out["n_frames"], out["status"] = n_frames, status
    return _typed(out)


# ---------------------------------------------------------------------------------------------
# Summaries and files
# ---------------------------------------------------------------------------------------------


def counts_key(dataset: str, df: pd.DataFrame) -> str | None:
    """The OFFICIAL_COUNTS entry a manifest compares with; SSv2's list format shows in its class names."""
    if dataset == "ssv2":
        otam = df["class"].map(lambda c: bool(_OTAM_CLASS.match(c))).all() if len(df) else False
        return "ssv2_otam" if otam else "ssv2_cmn"
    return dataset if dataset in OFFICIAL_COUNTS else None


def split_counts(df: pd.DataFrame, dataset: str | None = None) -> pd.DataFrame:
    """Per split: videos listed (a missing class's row is no video), videos ok, and the official count (NA when not known)."""
    official = OFFICIAL_COUNTS.get(counts_key(dataset, df) or "") if dataset else None
    videos = ~df["video_id"].str.endswith(MISSING_CLASS)
    listed = videos.groupby(df["split"]).sum().reindex(SPLITS, fill_value=0)
    ok = df["status"].eq("ok").groupby(df["split"]).sum().reindex(SPLITS, fill_value=0)
    table = pd.DataFrame({"listed": listed.astype(int), "ok": ok.astype(int)}, index=list(SPLITS))
    table["official"] = pd.array(list(official) if official else [pd.NA] * len(SPLITS), dtype="Int64")
    return table


def bad_videos(df: pd.DataFrame) -> pd.DataFrame:
    """The rows that are not usable, with their reason: the report written next to a manifest."""
    return df.loc[df["status"] != "ok", list(COLUMNS)]


def bad_kinds(df: pd.DataFrame) -> Counter[str]:
    """How many bad rows of each kind: the part of the status before the colon, or "missing class"."""
    return Counter(
        "missing class" if video_id.endswith(MISSING_CLASS) else status.split(":", 1)[0]
        for video_id, status in zip(df["video_id"], df["status"], strict=False)
        if status != "ok"
    )


def write_manifest(df: pd.DataFrame, path: Path) -> Path:
    """Write CSV or Parquet, chosen by the suffix (.csv, .parquet, .pq)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = _typed(df)
    if path.suffix.lower() in (".parquet", ".pq"):
        table.to_parquet(path, index=False)
    elif path.suffix.lower() == ".csv":
        table.to_csv(path, index=False)
    else:
        raise ManifestError(f"{path}: a manifest is .csv or .parquet")
    return path


def read_manifest(path: Path) -> pd.DataFrame:
    """Read a manifest written by write_manifest (CSV or Parquet by suffix), columns checked."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest")
    if path.suffix.lower() in (".parquet", ".pq"):
        table = pd.read_parquet(path)
    else:
        table = pd.read_csv(path, dtype={c: str for c in COLUMNS if c != "n_frames"}, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ManifestError(f"{path}: not a manifest, missing column(s) {', '.join(missing)}")
    return _typed(table)


def dataset_name(kind: str, videos: Path, name: str | None = None) -> str:
    """The name later stages know a dataset by: `name`, else a built-in's own, else the videos folder's
    own name (characters other than letters, digits, _ . - become _). A user's dataset cannot take a
    built-in's name, which names that benchmark's manifest and caches."""
    if name is None:
        name = kind if kind != "folder" else re.sub(r"[^\w.-]+", "_", nfc(Path(videos).resolve().name)).strip("_.")
        fix = " (its folder's name): pass --name NAME"
    else:
        name, fix = nfc(name), ""
    if not _NAME.fullmatch(name):
        raise ManifestError(f"dataset name {name!r}{fix}: use letters, digits, _ . - (it names a file and a folder)")
    if name in DATASETS and name not in (kind, "folder"):
        raise ManifestError(f"dataset name {name!r}{fix}: that is the built-in dataset's; choose another (--name)")
    return name


def unlisted_folders(videos: Path, classes: dict[str, str]) -> list[str]:
    """Folders of videos under `videos` that no class of a class-level CSV names (compared as `_norm`
    does: NFC, case, spaces): their videos are in no split."""
    listed = {_norm(c) for c in classes}
    return sorted(name for key, name in _VideoIndex(Path(videos)).folders.items() if key not in listed)


def local_manifest(name: str) -> Path | None:
    """The manifest `strm manifest` wrote for a dataset name, if any (CSV, else Parquet)."""
    found = [LOCAL_MANIFESTS / f"{name}{suffix}" for suffix in (".csv", ".parquet")]
    return next((p for p in found if p.is_file()), None)


def resolve_manifest(
    dataset: str,
    videos: Path | None = None,
    manifest: Path | None = None,
    split_dir: Path | None = None,
    classes_csv: Path | None = None,
) -> tuple[pd.DataFrame, str]:
    """(the manifest a stage works on, where it came from): `manifest`; else one built now from the split
    definition given; else the one `strm manifest` wrote for this name; else a built-in's, built now."""
    if manifest is not None:
        return read_manifest(manifest), str(manifest)
    defined = split_dir is not None or classes_csv is not None
    written = local_manifest(dataset)
    if written is not None and not defined:
        return read_manifest(written), str(written)
    if not defined and dataset not in DATASETS:
        raise ManifestError(
            f"no manifest for dataset {dataset!r} ({LOCAL_MANIFESTS / dataset}.csv): write it with "
            f"`strm manifest folder --videos DIR --classes CSV --name {dataset}`, or pass --manifest"
        )
    if not defined and dataset == "folder":
        known = sorted(p.stem for p in LOCAL_MANIFESTS.glob("*.csv") if not p.stem.endswith(".report"))
        raise ManifestError(
            "folder is a kind of dataset, not a name: give the name `strm manifest folder` printed "
            f"(manifests in {LOCAL_MANIFESTS}: {', '.join(known) or 'none'}), or --classes CSV"
        )
    if videos is None:
        raise ManifestError(f"{dataset}: --videos is needed to find the videos (no manifest was given or written)")
    kind = dataset if dataset in DATASETS else "folder"
    return build_manifest(kind, videos, split_dir=split_dir, classes_csv=classes_csv), f"built from {videos}"


def training_manifest(
    dataset: str,
    videos: Path,
    manifest: Path | None = None,
    *,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[pd.DataFrame, int]:
    """The manifest a fine-tune reads, with the frame counts of usable train/val rows filled in.

    Counted once, on rank 0, then sent to every rank; returns (manifest, videos counted now).
    `progress(done, total)` follows the counting; `device` is the run's (collectives travel there).
    """
    table, counted = None, 0
    if distributed.rank_world()[0] == 0:
        table = resolve_manifest(dataset, videos, manifest)[0]
        unknown = table["split"].isin(["train", "val"]) & table["status"].eq("ok") & (table["n_frames"] < 0)
        counted = int(unknown.sum())
        if counted:
            done = [0]

            def step(k: int) -> None:
                done[0] += k
                if progress is not None:
                    progress(done[0], counted)

            checked = validate_manifest(table[unknown], progress=step)
            for column in ("n_frames", "status"):
                table.loc[unknown, column] = checked[column]
    table = distributed.broadcast_object(table, distributed.resolve_device(device))
    return table, counted
