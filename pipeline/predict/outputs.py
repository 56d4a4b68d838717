"""What a person reads from predictions: windows merged into segments (short flickers absorbed), the
terminal table's rows, the CSV, each action's colour, where predicted and true segments disagree, and a
recording's timeline figure under a name no earlier run holds.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

EPS = 1e-6
UNKNOWN = "unknown"


def owned_spans(windows: Sequence[dict]) -> list[tuple[float, float]]:
    """The time each window owns: from halfway to the previous window's centre to halfway to the next's
    (the first from its start, the last to its end). Segments and the annotated video both read it."""
    centres = [(w["start"] + w["end"]) / 2 for w in windows]
    return [
        (
            w["start"] if i == 0 else (centres[i - 1] + centres[i]) / 2,
            w["end"] if i == len(windows) - 1 else (centres[i] + centres[i + 1]) / 2,
        )
        for i, w in enumerate(windows)
    ]


def _pieces(windows: list[dict]) -> list[dict]:
    """Each classified window with the time it owns (owned_spans); runs of one prediction joined."""
    pieces: list[dict] = []
    for w, (lo, hi) in zip(windows, owned_spans(windows), strict=True):
        if w.get("prediction") is None:
            continue
        last = pieces[-1] if pieces else None
        if last is not None and last["prediction"] == w["prediction"] and abs(last["end"] - lo) < EPS:
            last["end"], last["windows"] = hi, last["windows"] + [w]
        else:
            pieces.append({"start": lo, "end": hi, "prediction": w["prediction"], "windows": [w]})
    return pieces


def _support(segment: dict, label: str) -> float:
    """How much a segment's windows favour `label`: their mean probability of it (0 for unknown)."""
    if label == UNKNOWN:
        return 0.0
    return float(np.mean([w.get("probabilities", {}).get(label, 0.0) for w in segment["windows"]]))


def _absorb_short(segments: list[dict], min_length: float) -> list[dict]:
    """Segments shorter than `min_length` merged into a touching neighbour, shortest first: both neighbours
    when they agree (a flicker inside one action), else the one whose action its windows favour."""
    segments = [dict(s) for s in segments]
    while True:
        touching = [
            (s["end"] - s["start"], i)
            for i, s in enumerate(segments)
            if s["end"] - s["start"] < min_length - EPS
            and (
                (i > 0 and abs(segments[i - 1]["end"] - s["start"]) < EPS)
                or (i + 1 < len(segments) and abs(segments[i + 1]["start"] - s["end"]) < EPS)
            )
        ]
        if not touching:
            return segments
        i = min(touching)[1]
        short = segments[i]
        left = i - 1 if i > 0 and abs(segments[i - 1]["end"] - short["start"]) < EPS else None
        right = i + 1 if i + 1 < len(segments) and abs(segments[i + 1]["start"] - short["end"]) < EPS else None
        sides = [k for k in (left, right) if k is not None]
        target = max(
            sides, key=lambda k: (_support(short, segments[k]["prediction"]), segments[k]["end"] - segments[k]["start"])
        )
        short["prediction"] = segments[target]["prediction"]
        segments = _join(segments)


def _join(segments: list[dict]) -> list[dict]:
    """Touching segments of one prediction as one."""
    joined: list[dict] = []
    for s in segments:
        if joined and joined[-1]["prediction"] == s["prediction"] and abs(joined[-1]["end"] - s["start"]) < EPS:
            joined[-1] = {**joined[-1], "end": s["end"], "windows": joined[-1]["windows"] + s["windows"]}
        else:
            joined.append(s)
    return joined


def _relabel(segments: list[dict]) -> list[dict]:
    """Each known segment labelled with the action its windows favour most (their mean probability), so a
    segment that absorbed flickers never shows a runner-up above its own action; touching ones joined."""
    for s in segments:
        if s["prediction"] != UNKNOWN and s["windows"][0].get("probabilities"):
            actions = s["windows"][0]["probabilities"]
            s["prediction"] = max(actions, key=lambda a: _support(s, a))
    return _join(segments)


def merge_segments(windows: list[dict], min_length: float = 0.0) -> list[dict]:
    """Adjacent windows of one prediction merged into segments that do not overlap (each window owns the
    time from halfway to the previous window's centre to halfway to the next's), then segments shorter than
    `min_length` seconds absorbed by a neighbour (a window that failed leaves a gap nothing crosses) and
    each segment labelled with the action its windows favour.
    [{start, end, prediction, probability (its windows' mean probability of it), windows, runner_up,
    runner_up_probability}, with `action` (the windows' favourite) for an unknown segment]."""
    segments = _pieces(windows)
    if min_length > 0:
        segments = _relabel(_absorb_short(segments, min_length))
    out = []
    for s in segments:
        ws, label = s["windows"], s["prediction"]
        means: dict[str, float] = {}
        for w in ws:
            for action, p in w.get("probabilities", {}).items():
                means[action] = means.get(action, 0.0) + p / len(ws)
        ranked = sorted((a for a in means if a != label), key=lambda a: -means[a])
        if label == UNKNOWN or not means:
            probability = float(np.mean([w["probability"] for w in ws]))
        else:
            probability = means.get(label, 0.0)
        row = {
            "start": round(s["start"], 3),
            "end": round(s["end"], 3),
            "prediction": label,
            "probability": probability,
            "windows": len(ws),
            "runner_up": ranked[0] if ranked else None,
            "runner_up_probability": means[ranked[0]] if ranked else None,
        }
        if label == UNKNOWN and ranked:
            row["action"] = ranked[0]
            row["runner_up"] = ranked[1] if len(ranked) > 1 else None
            row["runner_up_probability"] = means[ranked[1]] if len(ranked) > 1 else None
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------- rows


def display_names(paths: list[str]) -> tuple[list[str], str | None]:
    """Each path as a person tells them apart: relative to the folder they all share (returned too), or
    whole when they share none. Never cut."""
    if not paths:
        return [], None
    try:
        common = os.path.commonpath([os.path.abspath(os.path.dirname(p)) for p in paths])
    except ValueError:  # different drives
        return list(paths), None
    return [os.path.relpath(os.path.abspath(p), common) for p in paths], common


def windowed(record: dict) -> bool:
    """A recording cut into several windows (a clip no longer than one window is read as a clip)."""
    return len(record.get("windows") or []) > 1


def _runner_up(r: dict) -> tuple[str | None, float | None]:
    second = r["top_k"][1] if len(r.get("top_k", [])) > 1 else [None, None]
    return second[0], second[1]


def table_rows(records: list[dict]) -> tuple[list[tuple[str, str, str, str]], str | None]:
    """(query, action, probability, runner-up) per clip and per segment of a windowed recording, and the
    folder the queries' names are relative to."""
    names, common = display_names([r["path"] for r in records])
    rows = []
    for name, r in zip(names, records, strict=True):
        if windowed(r):
            for s in r["segments"]:
                action = s["prediction"] + (f" ({s['action']})" if "action" in s else "")
                second = f"{s['runner_up']} ({s['runner_up_probability']:.3f})" if s["runner_up"] else ""
                rows.append((f"{name} {s['start']:.1f}-{s['end']:.1f} s", action, f"{s['probability']:.3f}", second))
            continue
        action = r["prediction"] or f"failed: {r['reason']}"
        if r.get("action") and r["prediction"] != r["action"]:
            action += f" ({r['action']})"
        runner, p = _runner_up(r)
        note = f" [{r['windows_reason']}]" if r.get("windows_reason") else ""
        rows.append(
            (
                name + note,
                action,
                f"{r['probability']:.3f}" if r["probability"] is not None else "",
                f"{runner} ({p:.3f})" if runner else "",
            )
        )
    return rows, common


CSV_COLUMNS = (
    "path",
    "kind",
    "start",
    "end",
    "status",
    "reason",
    "prediction",
    "probability",
    "action",
    "score",
    "threshold",
    "runner_up",
    "runner_up_probability",
    "note",
)


def csv_rows(records: list[dict]) -> list[dict]:
    """One row per clip (kind "clip"); a windowed recording gives its segments (kind "segment") and its
    windows (kind "window", keeping the underlying action, score and threshold when labelled unknown)."""
    rows = []
    for r in records:
        if not windowed(r):
            runner, p = _runner_up(r)
            note = "; ".join(x for x in (r.get("note"), r.get("windows_reason")) if x)
            rows.append({**r, "kind": "clip", "runner_up": runner, "runner_up_probability": p, "note": note or None})
            continue
        for s in r["segments"]:
            rows.append({**s, "path": r["path"], "kind": "segment", "status": "ok"})
        for w in r["windows"]:
            status = "ok" if w["prediction"] is not None else "failed"
            ranked = sorted(w["probabilities"], key=lambda a: -w["probabilities"][a])
            runner = next((a for a in ranked if a != w.get("action", w["prediction"])), None)
            rows.append(
                {
                    **w,
                    "path": r["path"],
                    "kind": "window",
                    "status": status,
                    "runner_up": runner,
                    "runner_up_probability": w["probabilities"].get(runner) if runner else None,
                }
            )
    return [{c: row.get(c) for c in CSV_COLUMNS} for row in rows]


def write_csv(path: Path, records: list[dict]) -> Path:
    """csv_rows as a CSV file."""
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(csv_rows(records), columns=list(CSV_COLUMNS)).to_csv(path, index=False)
    return path


# ---------------------------------------------------------------------------------------------- figures


def unused_path(folder: Path, stem: str, suffix: str) -> Path:
    """folder/stem+suffix, or stem-2, stem-3, ... when taken: created empty at once, so neither an earlier
    run's file nor a parallel run's is ever overwritten."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in itertools.count(1):
        path = folder / (f"{stem}{suffix}" if k == 1 else f"{stem}-{k}{suffix}")
        try:
            path.open("x").close()
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def action_colours(actions: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """RGB in 0..1 per action by its place in `actions` (Tableau's colours without grey, then the same half
    lightened), so the timeline PNG and the annotated video agree; grey is UNKNOWN_COLOUR's alone."""
    from matplotlib.colors import TABLEAU_COLORS, to_rgb

    base = [to_rgb(c) for name, c in TABLEAU_COLORS.items() if name != "tab:gray"]
    palette = base + [tuple((1 + x) / 2 for x in c) for c in base]
    return {a: tuple(palette[i % len(palette)]) for i, a in enumerate(actions)}  # type: ignore[misc]


UNKNOWN_COLOUR = (0.5, 0.5, 0.5)


def disagreements(segments: Sequence[dict], truth: Sequence[dict]) -> list[dict]:
    """Where predicted segments ({start, end, prediction}) and true ones ({start, end, action}) disagree, as
    time ranges [{start, end, predicted, truth}] (predicted None where no window was classified); only the
    time the truth covers counts, and touching ranges of one disagreement are joined."""

    def label_at(items: Sequence[dict], key: str, t: float) -> str | None:
        return next((s[key] for s in items if s["start"] - EPS <= t < s["end"] + EPS), None)

    cuts = sorted({round(float(x), 6) for s in [*segments, *truth] for x in (s["start"], s["end"])})
    out: list[dict] = []
    for lo, hi in itertools.pairwise(cuts):
        mid = (lo + hi) / 2
        true, predicted = label_at(truth, "action", mid), label_at(segments, "prediction", mid)
        if true is None or true == predicted:
            continue
        if out and out[-1]["end"] == lo and (out[-1]["predicted"], out[-1]["truth"]) == (predicted, true):
            out[-1]["end"] = hi
        else:
            out.append({"start": lo, "end": hi, "predicted": predicted, "truth": true})
    return out


def timeline_figure(record: dict, actions: list[str], path: Path, truth: Sequence[dict] | None = None) -> Path:
    """Time on x, one probability curve per action over the windows, the merged segments shaded; below, the
    segments as a strip, with the true ones ({start, end, action}) beside them when known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = [w for w in record["windows"] if w["prediction"] is not None]
    rows = [("predicted", record["segments"], "prediction")]  # from the bottom up: the true ones above
    rows += [("true", truth, "action")] if truth else []
    fig, (ax, strip) = plt.subplots(
        2, 1, figsize=(10, 3.4 + 0.3 * len(rows)), dpi=110, sharex=True, height_ratios=[4, 0.45 * len(rows)]
    )
    colours = {**action_colours(actions), UNKNOWN: UNKNOWN_COLOUR}
    mids = [(w["start"] + w["end"]) / 2 for w in windows]
    for action in actions:
        ax.plot(mids, [w["probabilities"].get(action, 0.0) for w in windows], label=action, color=colours[action])
    for s in record["segments"]:
        ax.axvspan(s["start"], s["end"], color=colours.get(s["prediction"], UNKNOWN_COLOUR), alpha=0.12, lw=0)
        ax.text((s["start"] + s["end"]) / 2, 1.02, s["prediction"], ha="center", va="bottom", fontsize=6, rotation=12)
    ax.set(ylabel="probability", ylim=(0, 1.1), title=Path(record["path"]).name)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    for y, (_, items, key) in enumerate(rows):
        for s in items:
            colour = colours.get(s[key], UNKNOWN_COLOUR)
            strip.broken_barh([(s["start"], s["end"] - s["start"])], (y + 0.1, 0.8), color=colour)
    strip.set(ylim=(0, len(rows)), xlabel="time (s)")
    strip.set_yticks([y + 0.5 for y in range(len(rows))], [name for name, _, _ in rows], fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
