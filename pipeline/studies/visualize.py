"""What the heads look at: activation maps before and after PLE (paper Fig. 1 and 5) and TRM tuple matches (Fig. 10).

Why it is built this way: the pictures are computed from the same cached features and the same
heads that evaluation uses (through `encode(..., intermediates=True)` and `trm_attention`), and
drawn over the very pixels that produced those features: view 0 of each video, decoded again by
`pipeline.data.video.load_view` with the cache's geometry (shorter side, crop, view seed). Without the
videos the figures still draw, with grey placeholders where frames would be, so any cache and
checkpoint can be inspected. Nothing here prints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.data.video import VideoError, ViewSpec, count_frames, load_view
from pipeline.features.recipe import FeatureRecipe
from pipeline.heads import STRMHeads

Frames = Callable[[str], "torch.Tensor | None"]  # video id -> uint8 [L, 3, H, W] (view 0), or None


class FrameSource:
    """View 0 of a cache's videos, decoded with the geometry the cache was extracted with.

    `manifest` maps video ids to files (columns video_id, path, optionally n_frames); `recipe` is
    the cache's (None: the default 256/224 geometry). A video that is missing or cannot be decoded
    gives None, so a figure falls back to placeholders instead of failing.
    """

    def __init__(self, manifest: pd.DataFrame, recipe: FeatureRecipe | None, videos_root: Path | None = None) -> None:
        self.spec = recipe.view_spec() if recipe is not None else ViewSpec()
        self.seed = recipe.view_seed if recipe is not None else 0
        self.rows = {str(r.video_id): r for r in manifest.itertuples(index=False)}
        self.root = videos_root
        self.errors: dict[str, str] = {}

    def __call__(self, video_id: str) -> torch.Tensor | None:
        row = self.rows.get(video_id)
        if row is None or not str(row.path):
            self.errors[video_id] = "not in the manifest"
            return None
        path = Path(str(row.path))
        if self.root is not None and not path.is_absolute():
            path = self.root / path
        try:
            n = int(getattr(row, "n_frames", -1))
            n = n if n > 0 else count_frames(path)
            return load_view(path, n, video_id, 0, self.seed, self.spec)
        except (VideoError, ValueError, OSError) as err:
            self.errors[video_id] = str(err)
            return None


# ----------------------------------------------------------------------------------------------
# Activation maps


@dataclass(frozen=True)
class ActivationMaps:
    """Per frame, the L2 norm of each patch feature on the patch grid: [L, g, g] (g*g = P)."""

    before: np.ndarray  # PLE's input: the standardised backbone features
    after: np.ndarray | None  # PLE's output; None for heads without PLE
    change: np.ndarray | None  # ||output - input||: where PLE changed the features most


def activation_maps(heads: STRMHeads, features: torch.Tensor) -> ActivationMaps:
    """Patch magnitudes before and after PLE, and of PLE's change, for one video's features [L, P, D] (eval, no grad)."""
    frames, patches, _ = features.shape
    grid = math.isqrt(patches)
    if grid * grid != patches:
        raise ValueError(f"{patches} patches do not form a square grid")
    heads.eval()
    with torch.inference_mode():
        x = features.float()
        standardised = heads.standardize(x)
        emb = heads.encode(x[None], intermediates=True)
        ple = None if emb.ple_patches is None else emb.ple_patches[0]
    shape = (frames, grid, grid)

    def grid_of(t: torch.Tensor) -> np.ndarray:
        return t.norm(dim=-1).reshape(shape).numpy()

    return ActivationMaps(
        grid_of(standardised),
        None if ple is None else grid_of(ple),
        None if ple is None else grid_of(ple - standardised),
    )


def _placeholder(ax, text: str) -> None:
    ax.imshow(np.full((8, 8, 3), 0.85))
    ax.text(3.5, 3.5, text, ha="center", va="center", fontsize=7, color="0.3")


def _frame_image(frames: torch.Tensor | None, t: int) -> np.ndarray | None:
    return None if frames is None else frames[t].permute(1, 2, 0).numpy()


def _overlay(ax, image: np.ndarray | None, heat: np.ndarray, vmax: float) -> None:
    """A patch map upsampled (bilinear) over the frame, in the paper's jet colours."""
    size = image.shape[0] if image is not None else 64
    up = F.interpolate(
        torch.from_numpy(heat)[None, None].float(), size=(size, size), mode="bilinear", align_corners=False
    )[0, 0]
    if image is not None:
        ax.imshow(image)
    ax.imshow(up.numpy(), cmap="jet", alpha=0.5 if image is not None else 1.0, vmin=0.0, vmax=vmax)


def activation_figure(maps: ActivationMaps, frames: torch.Tensor | None, title: str = "") -> plt.Figure:
    """Rows: the frames, then the patch magnitudes before PLE, after PLE, and of PLE's change, over the frames.

    Each row is scaled by its own maximum over the whole video, so what changes between frames
    (and between the rows' spatial spread) is visible, not the rows' absolute scales.
    """
    rows = [("frames", None), ("before PLE", maps.before)]
    if maps.after is not None:
        rows += [("after PLE", maps.after), ("PLE's change", maps.change)]
    n = maps.before.shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.35 * n, 1.45 * len(rows) + 0.4), squeeze=False)
    for r, (name, heat) in enumerate(rows):
        vmax = float(heat.max()) if heat is not None and heat.max() > 0 else 1.0
        for t in range(n):
            ax = axes[r, t]
            image = _frame_image(frames, t)
            if heat is None:
                ax.imshow(image) if image is not None else _placeholder(ax, f"frame {t}")
            else:
                _overlay(ax, image, heat[t], vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if t == 0:
                ax.set_ylabel(name, fontsize=9)
            if r == 0:
                ax.set_title(f"t={t}", fontsize=8)
    if maps.after is None:
        title = (title + "\n" if title else "") + "(these heads have no PLE: only the input magnitudes are shown)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# Tuple matches


@dataclass(frozen=True)
class TupleMatch:
    """A support tuple a query tuple attends to: which shot of the class, which frames, what weight."""

    shot: int  # position among the class's support videos (0..shot-1)
    support_index: int  # position in the task's support list
    frames: tuple[int, ...]
    weight: float


@dataclass(frozen=True)
class QueryTupleMatches:
    """One query tuple (its frames) and its best-matching support tuples, strongest first."""

    frames: tuple[int, ...]
    matches: tuple[TupleMatch, ...]


def tuple_matches(
    heads: STRMHeads,
    support: torch.Tensor,
    support_labels: torch.Tensor,
    query: torch.Tensor,
    label: int,
    *,
    query_tuples: int = 2,
    top: int = 3,
) -> list[QueryTupleMatches]:
    """The TRM attention of one query video [L, P, D] over the tuples of class `label`'s support videos.

    support [n_s, L, P, D] with labels [n_s] (0..way-1). Returns the `query_tuples` query tuples whose
    attention is most concentrated (highest top weight), each with its `top` support tuples.
    """
    heads.eval()
    with torch.inference_mode():
        s = heads.encode(support.float())
        q = heads.encode(query.float()[None])
        weights = heads.trm_attention(s, support_labels, q)[0, label]  # [T_q, shot, T_s]
    tuples = s.tuples[0].cpu().numpy()
    shots = np.flatnonzero(support_labels.cpu().numpy() == label)  # the order trm_attention groups shots in
    t_q, n_shot, t_s = weights.shape
    flat = weights.reshape(t_q, n_shot * t_s)
    strongest = flat.max(dim=1).values.argsort(descending=True)[:query_tuples]
    out = []
    for qt in strongest.tolist():
        values, where = flat[qt].topk(min(top, flat.shape[1]))
        matches = tuple(
            TupleMatch(int(j) // t_s, int(shots[int(j) // t_s]), tuple(int(f) for f in tuples[int(j) % t_s]), float(v))
            for v, j in zip(values, where, strict=False)
        )
        out.append(QueryTupleMatches(tuple(int(f) for f in tuples[qt]), matches))
    return out


def tuple_match_figure(
    found: Sequence[QueryTupleMatches],
    query_frames: torch.Tensor | None,
    support_frames: Callable[[int], torch.Tensor | None],
    title: str = "",
) -> plt.Figure:
    """One row per query tuple: its frames, then each best-matching support tuple's frames with its weight.

    `support_frames(support_index)` gives that support video's frames (view 0) or None.
    """
    width = len(found[0].frames)
    top = max(len(f.matches) for f in found)
    cols = width * (1 + top)
    fig, axes = plt.subplots(len(found), cols, figsize=(1.25 * cols, 1.65 * len(found) + 0.5), squeeze=False)
    cache: dict[int, torch.Tensor | None] = {}
    for r, row in enumerate(found):
        cells: list[tuple[str, tuple[int, ...], torch.Tensor | None, float | None]] = [
            ("query", row.frames, query_frames, None)
        ]
        for m in row.matches:
            if m.support_index not in cache:
                cache[m.support_index] = support_frames(m.support_index)
            cells.append((f"shot {m.shot}", m.frames, cache[m.support_index], m.weight))
        for c, (name, frame_ids, frames, weight) in enumerate(cells):
            for k, t in enumerate(frame_ids):
                ax = axes[r, c * width + k]
                image = _frame_image(frames, t)
                ax.imshow(image) if image is not None else _placeholder(ax, f"frame {t}")
                ax.set_xticks([])
                ax.set_yticks([])
                label = f"{name} t={t}" if weight is None else f"{name} t={t}\nw={weight:.2f}"
                ax.set_title(label, fontsize=7, color="black" if weight is None else "tab:blue")
                for spine in ax.spines.values():
                    spine.set_edgecolor("tab:red" if weight is None else "tab:blue")
                    spine.set_linewidth(2)
        for c in range(len(cells) * width, cols):
            axes[r, c].axis("off")
    fig.suptitle(
        title or "TRM: query tuples (red) and the support tuples they attend to most (blue, weight w)", fontsize=10
    )
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# A set of pictures for one split


def render(
    heads: STRMHeads,
    split,  # pipeline.features.cache.SplitFeatures
    out: Path | str,
    *,
    frames: Frames | None = None,
    seed: int = 0,
    way: int = 5,
    shot: int = 5,
    count: int = 2,
) -> dict[str, Path]:
    """Activation maps and tuple matches for the first `count` queries of task 0 of `seed` (view 0), as PNGs.

    Returns figure key -> path; keys are "activation:<class> (<video id>)" and "tuples:<...>".
    """
    from pipeline.evaluation.tasks import sample_tasks
    from pipeline.studies.report import save_figure

    out = Path(out)
    tasks = sample_tasks(split.labels, episodes=1, way=way, shot=shot, queries=1, seed=seed)
    support = torch.as_tensor(tasks.support[0])
    support_labels = torch.as_tensor(tasks.support_labels[0])
    ids = list(split.video_ids)
    fetch = frames or (lambda _video_id: None)
    written: dict[str, Path] = {}
    for i, (video, label) in enumerate(zip(tasks.query[0][:count], tasks.query_labels[0][:count], strict=False)):
        name = split.class_names[int(tasks.classes[0][label])]
        about = f"{name} ({ids[video]})"
        query_frames = fetch(ids[video])
        features = split.features[int(video), 0]
        maps = activation_maps(heads, features)
        written[f"activation:{about}"] = save_figure(
            activation_figure(maps, query_frames, about), out / f"activation_{i}.png"
        )
        found = tuple_matches(heads, split.features[support, 0], support_labels, features, int(label))
        figure = tuple_match_figure(
            found,
            query_frames,
            lambda k: fetch(ids[int(support[k])]),
            f"{about}: query tuples (red) and the support tuples of its class TRM attends to most (blue)",
        )
        written[f"tuples:{about}"] = save_figure(figure, out / f"tuples_{i}.png")
    return written
