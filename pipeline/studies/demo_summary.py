"""The demo's report stage: the summary figures, each trained row's training summary, the tasks that
only the order of events tells apart, and the notes, gathered into demo_report.DemoFacts and written
as OUT/report.md.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import evaluation as ev
from pipeline.data import synth
from pipeline.data.episodes import TaskBatch
from pipeline.features.readers import SplitFeatures
from pipeline.studies import demo_report, report
from pipeline.studies.demo_openset import OpenSetFacts
from pipeline.studies.demo_plan import MAIN, REFERENCE, StageClock
from pipeline.training.runs import read_metrics

# The paired contrasts the report reads out (report.Contrast: which rows, what they say).
CONTRASTS = (
    report.Contrast("the whole of STRM over the TRM baseline", "strm", "trm", role="total"),
    report.Contrast("adding PLE (patch attention + per-patch MLP) to TRM", "ple-trm", "trm", role="alone", block="PLE"),
    report.Contrast("adding FLE (frame mixer) to TRM", "fle-trm", "trm", role="alone", block="FLE"),
    report.Contrast("adding PLE and FLE to TRM", "ple-fle-trm", "trm", role="detail"),
    report.Contrast("adding FLE on top of PLE", "ple-fle-trm", "ple-trm", role="on top", block="FLE"),
    report.Contrast("adding PLE on top of FLE", "ple-fle-trm", "fle-trm", role="on top", block="PLE"),
    report.Contrast(
        "training with QC (strm against ple-fle-trm)",
        "strm",
        "ple-fle-trm",
        flat_means="Training with the QC loss brings nothing that matters here.",
    ),
    report.Contrast(
        "joint spatio-temporal attention over all patches (Jnt-ST, one layer) instead of PLE and FLE",
        "jnt-st-1",
        "ple-fle-trm",
    ),
    report.Contrast(
        "forcing PLE's attention gate gamma to 0 after training",
        "strm, gamma forced to 0",
        "strm",
        flat_means="PLE's self-attention between patches contributes nothing that matters: whatever PLE adds "
        "comes from its per-patch MLP (psi) and its positional encoding.",
    ),
    report.Contrast(
        "dropping the QC logits after training",
        "strm, no QC",
        "strm",
        flat_means="QC's logits do not matter at test time: TRM's logits decide.",
    ),
)


def write_report(
    out: Path,
    sizes: list[tuple[str, str, str]],
    clock: StageClock,
    *,
    cache_path: Path,
    workers: int,
    test: SplitFeatures,
    tasks: TaskBatch,
    results: dict[str, ev.EvalResult],
    checkpoints: dict[str, Path],
    sweeps: dict[str, list[ev.EvalResult]],
    table: pd.DataFrame,
    figures: dict[str, str],
    prediction: dict,
    open_set: OpenSetFacts | None = None,
) -> Path:
    """The report stage: the summary figures, then OUT/report.md from every stage's facts (`sizes`:
    DemoSizes.rows of the run)."""
    main = {k: results[k] for k in MAIN}
    both = reversed_pair_tasks(tasks, test.class_names)
    figures["accuracy"] = _save(report.accuracy_bars(results), out, "figures/accuracy.png")
    curves = {label: read_metrics(path.parent) for label, path in checkpoints.items()}
    figures["training"] = _save(report.training_curves(curves), out, "figures/training.png")
    figures["shots"] = _save(report.shot_curves(sweeps), out, "figures/shots.png")
    figures["per_class"] = _save(report.per_class_bars(main, order_by="strm"), out, "figures/per_class.png")
    figures["ablation"] = "ablation.png"  # drawn with the ablation table
    strm_ckpt = torch.load(checkpoints["strm"], map_location="cpu", weights_only=True)
    gamma = strm_ckpt["model"].get("ple.gamma")
    facts = demo_report.DemoFacts(
        main=main,
        winner="strm",
        ablation=table,
        ablation_reference=REFERENCE,
        ablation_results=results,
        contrasts=CONTRASTS,
        gamma=None if gamma is None else float(gamma.reshape(-1)[0]),
        training={k: _training_summary(v) for k, v in checkpoints.items()},
        sizes=sizes,
        timings=clock.rows(),
        figures=figures,
        notes=_notes(cache_path, workers),
        command="strm demo",
        subsets=[
            (
                f'the tasks that hold both "A then B" and "B then A" (same frames, other order; '
                f"{int(both.sum())} of {len(both)})",
                report.subset_table(main, both),
            )
        ],
        prediction=prediction,
        open_set=open_set,
    )
    return report.write_markdown(out / "report.md", demo_report.demo_report(facts))


def _training_summary(checkpoint: Path) -> dict:
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    records = read_metrics(checkpoint.parent)
    trained = [r["task"] for r in records if r.get("kind") == "train"]
    state = ckpt.get("state", {})
    return {
        "tasks_trained": max(trained) if trained else None,
        "checkpoint": f"{checkpoint.parent.name}/{checkpoint.name}",
        "best_val": state.get("best_val"),
        "best_task": state.get("best_task"),
        "stopped_early": bool(state.get("stopped")),
    }


def _save(fig, out: Path, relative: str) -> str:
    report.save_figure(fig, out / relative)
    return relative


def reversed_pair_tasks(tasks: TaskBatch, class_names: list[str]) -> np.ndarray:
    """Tasks holding both "A then B" and "B then A" (A != B): only the order of events tells those apart."""
    order = [synth.parse_class(name) for name in class_names]
    reverse = {i: {j for j, (c, d) in enumerate(order) if (c, d) == (b, a)} for i, (a, b) in enumerate(order) if a != b}
    return np.array([any(reverse.get(int(c), set()) & set(row.tolist()) for c in row) for row in tasks.classes])


def _notes(cache_path: Path, workers: int) -> list[str]:
    return [
        "Flips are off in the training views: the paper's horizontal flip turns `enter_left` into `enter_right` and "
        "`exit_left` into `exit_right`, so a flipped training view of those classes would show another class's motion.",
        f"Cache: `{cache_path}`. Backbone frozen (ImageNet weights), features standardised per channel inside the heads; "
        "heads trained with the `frozen` preset (AdamW lr 1e-3, mean loss, one task a step).",
        f"Machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {workers} worker processes, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}, load average {os.getloadavg()[0]:.1f} when this report was written. "
        "Times are wall-clock and include whatever else was running on the machine.",
    ]
