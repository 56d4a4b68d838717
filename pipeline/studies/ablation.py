"""Ablation grids: heads variants x cardinalities x lambdas x tuple retention, trained with one seed and
evaluated on the same tasks, as one table like the paper's Tables 2-4.

Why this shape: an ablation is only worth reading when its rows differ in one thing. Every grid
point is trained with the same seed (so the same training tasks, views and initial weights where
shapes allow) and evaluated on identical test tasks, so each row carries a paired interval against
the reference row that is much tighter than the rows' own intervals. Post-training changes
(`strm:gamma0` forces PLE's gate to 0, `jnt-st-1:gamma0` every joint layer's, `strm:no-qc` drops
the QC logits) reuse the trained point and cost one evaluation. A grid point whose run is complete
and whose evaluation is on disk is not redone, so an interrupted grid resumes; `strm ablate` and the
demo run their grids through here. With `flops`, each row also gets its heads' forward GFLOPs on one
task (pipeline/evaluation/compute.py), so an accuracy gain can be read against what it costs.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch

from pipeline import evaluation as ev
from pipeline.evaluation.compute import TaskCompute, task_compute
from pipeline.features.cache import FeatureCache
from pipeline.features.readers import SplitFeatures
from pipeline.heads import VARIANTS, STRMHeads, load_heads
from pipeline.heads.openset import METHODS as OPEN_SET_METHODS
from pipeline.heads.variants import DEFAULT_OPTIONS
from pipeline.runtime import distributed
from pipeline.studies import report
from pipeline.training.runs import read_metrics
from pipeline.training.state import TrainProgress
from pipeline.training.train import make_config, train

PROTO = "proto"
AFTER_TRAINING = {"gamma0": "gamma forced to 0", "no-qc": "no QC"}
TABLE, TABLE_CSV, FIGURE = "ablation.md", "ablation.csv", "ablation.png"
FLOPS_COLUMNS = ("heads_gflop", "heads_flops_vs_reference")


@dataclass(frozen=True)
class GridPoint:
    """One row of an ablation: heads to train (or the proto baseline) and an optional post-training change."""

    variant: str
    cardinalities: tuple[int, ...] | None = None  # None: the variant's own
    lambda_qc: float | None = None  # None: the training default (DEFAULT_OPTIONS)
    retain: float | None = None  # fraction of tuples kept; None: all
    after: str | None = None  # a key of AFTER_TRAINING
    label: str = ""
    base_label: str = ""  # the label without the post-training change
    open_set: str | None = None  # an open-set training method (`strm+disc`); None: closed-set training

    @property
    def trained(self) -> GridPoint:
        """The point whose training run this row uses (itself without the post-training change)."""
        return replace(self, after=None, label=self.base_label or self.label)

    @property
    def slug(self) -> str:
        """A folder/file name for the row."""
        text = self.label.replace("Ω=", "card").replace("λ", "lambda")
        return re.sub(r"[^A-Za-z0-9.=+-]+", "_", text).strip("_")

    def heads_options(self) -> dict:
        options: dict = {}
        if self.cardinalities is not None:
            options["cardinalities"] = list(self.cardinalities)
        if self.retain is not None:
            options["tuple_keep"] = self.retain
        return options

    def describe(self) -> dict:
        """The row's settings as table columns."""
        cards = self.cardinalities or VARIANTS.get(self.variant, {}).get("cardinalities")
        return {
            "variant": self.variant,
            "cardinalities": "{" + ",".join(map(str, cards)) + "}" if cards else "",
            "lambda_qc": self.lambda_qc
            if self.lambda_qc is not None
            else (DEFAULT_OPTIONS["lambda_qc"] if VARIANTS.get(self.variant, {}).get("qc") else None),
            "retain": self.retain if self.retain is not None else (1.0 if self.variant != PROTO else None),
            "after_training": AFTER_TRAINING.get(self.after or "", ""),
            **({"open_set": self.open_set} if self.open_set else {}),
        }


def _floats(values: Sequence[str] | None, what: str) -> list[float | None]:
    out: list[float | None] = []
    for v in values or []:
        for part in str(v).split(","):
            if part.strip():
                try:
                    out.append(float(part))
                except ValueError:
                    raise ValueError(f"{what}: {part!r} is not a number") from None
    return out or [None]


def _cardinality_sets(values: Sequence[str] | None) -> list[tuple[int, ...] | None]:
    """'2', '1', '2+3' (a set), comma-separated or repeated -> tuples; none given -> [None]."""
    out: list[tuple[int, ...] | None] = []
    for v in values or []:
        for part in str(v).split(","):
            if part.strip():
                try:
                    out.append(tuple(sorted({int(w) for w in part.split("+")})))
                except ValueError:
                    raise ValueError(f"cardinalities: {part!r} is not a set such as 2 or 2+3") from None
    return out or [None]


def parse_grid(
    variants: Sequence[str],
    cardinalities: Sequence[str] | None = None,
    lambdas: Sequence[str] | None = None,
    retain: Sequence[str] | None = None,
) -> list[GridPoint]:
    """The Cartesian product of the axes, labelled by what varies; `proto` and `v:gamma0`/`v:no-qc` rows too,
    and `v+METHOD` rows trained with an open-set method (strm+eos, strm+disc, ...).

    Raises ValueError naming a variant, change or value that is not known.
    """
    names = [n.strip() for v in variants for n in str(v).split(",") if n.strip()]
    if not names:
        raise ValueError("no variants given")
    cards, lams, keeps = _cardinality_sets(cardinalities), _floats(lambdas, "lambdas"), _floats(retain, "retain")
    for keep in keeps:
        if keep is not None and not 0 < keep <= 1:
            raise ValueError(f"retain: {keep} is not a fraction in (0, 1]")
    points: list[GridPoint] = []
    for name in names:
        variant, _, after = name.partition(":")
        variant, plus, method = variant.partition("+")
        if plus and method not in OPEN_SET_METHODS[1:]:
            raise ValueError(f"{name}: unknown open-set method {method!r}; known: {', '.join(OPEN_SET_METHODS[1:])}")
        if variant == PROTO:
            points.append(GridPoint(PROTO, label=PROTO, base_label=PROTO))
            continue
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; known: {', '.join([*VARIANTS, PROTO])}")
        if after and after not in AFTER_TRAINING:
            raise ValueError(f"{name}: unknown post-training change {after!r}; known: {', '.join(AFTER_TRAINING)}")
        if after == "gamma0" and VARIANTS[variant]["ple"] != "attention" and not VARIANTS[variant]["joint"]:
            raise ValueError(f"{name}: variant {variant} has no PLE or joint attention gate to force to 0")
        if after == "no-qc" and not VARIANTS[variant]["qc"]:
            raise ValueError(f"{name}: variant {variant} has no QC to drop")
        for c, lam, keep in itertools.product(cards, lams, keeps):
            parts = [variant + plus + method]
            if len(cards) > 1:
                parts.append("Ω={" + ",".join(map(str, c or VARIANTS[variant]["cardinalities"])) + "}")
            if len(lams) > 1:
                parts.append(f"λ={lam if lam is not None else DEFAULT_OPTIONS['lambda_qc']:g}")
            if len(keeps) > 1:
                parts.append(f"retain {keep if keep is not None else 1.0:g}")
            base = " ".join(parts)
            label = base + (f", {AFTER_TRAINING[after]}" if after else "")
            points.append(GridPoint(variant, c, lam, keep, after or None, label, base, method or None))
    labels = [p.label for p in points]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ValueError(f"the grid holds the same row twice: {', '.join(dupes)}")
    return points


# ----------------------------------------------------------------------------------------------
# Training and evaluating one point


@dataclass(frozen=True)
class TrainSettings:
    """What every grid point is trained with (the frozen preset, overridden here)."""

    episodes: int = 10_000
    seed: int = 0
    val_every: int = 500
    val_episodes: int = 500
    patience: int | None = None  # None: the preset's
    lr: float | None = None
    log_every: int | None = None  # None: the preset's
    heads_options: dict = field(default_factory=dict)  # shared by every point (e.g. trm_dim); a point's own win
    device: str = "auto"  # where every point trains and is evaluated


def train_point(
    point: GridPoint,
    cache: FeatureCache,
    out: Path,
    settings: TrainSettings,
    *,
    train_split: SplitFeatures | None = None,
    val_split: SplitFeatures | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
) -> Path:
    """Train (or resume, or find complete) the point's heads in `out`; returns the checkpoint to evaluate.

    The checkpoint is best.pt (the best validation) when the run validated, else last.pt.
    """
    config = make_config(
        "frozen",
        cache.fingerprint.get("dataset"),
        variant=point.variant,
        episodes=settings.episodes,
        seed=settings.seed,
        lambda_qc=point.lambda_qc,
        heads_options={**settings.heads_options, **point.heads_options()},
        val_every=settings.val_every,
        val_episodes=settings.val_episodes,
        patience=settings.patience,
        lr=settings.lr,
        log_every=settings.log_every,
        device=settings.device,
        open_set=point.open_set,
    )
    result = train(config, cache, out, resume=True, progress=progress, train_split=train_split, val_split=val_split)
    return result.best_checkpoint or result.last_checkpoint


def _attention_gates(heads: STRMHeads) -> list[torch.nn.Parameter]:
    """The gamma gates `gamma0` zeroes: PLE's and every Jnt-ST layer's (None where gamma_zero removed them)."""
    blocks = [heads.ple, *(heads.joint.layers if heads.joint is not None else ())]
    return [b.gamma for b in blocks if getattr(b, "gamma", None) is not None]


def after_training(heads: STRMHeads, change: str | None) -> STRMHeads:
    """Apply a post-training change in place: `gamma0` zeroes the attention gates (PLE's, or each joint
    layer's), `no-qc` removes QC."""
    if change == "gamma0":
        gates = _attention_gates(heads)
        if not gates:
            raise ValueError(f"the {heads.variant!r} heads have no attention gate to force to 0")
        with torch.no_grad():
            for gamma in gates:
                gamma.zero_()
    elif change == "no-qc":
        heads.qc = None
    elif change is not None:
        raise ValueError(f"unknown post-training change {change!r}")
    return heads


def _checkpoint_id(path: Path) -> dict:
    """Which checkpoint a row was evaluated from, and its first learned attention gate (PLE's or Jnt-ST's)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    gates = _attention_gates(load_heads(ckpt)[0])
    return {
        "checkpoint": str(path),
        "task_index": int(ckpt.get("task_index", -1)),
        "val": ckpt.get("val"),
        "gamma": float(gates[0].detach().reshape(-1)[0]) if gates else None,
    }


def evaluate_point(
    point: GridPoint,
    checkpoint: Path | None,
    test: SplitFeatures,
    tasks,
    record: Path,
    *,
    seed: int,
    device: str | torch.device = "cpu",
) -> ev.EvalResult:
    """Evaluate the point on exactly `tasks` (a TaskBatch of `test`); reuse `record` when it holds this very evaluation."""
    about = {"row": point.label, "point": asdict(point), **(_checkpoint_id(checkpoint) if checkpoint else {})}
    digest = ev.episodes_digest(tasks, test.video_ids)
    if record.exists():
        try:
            saved = ev.read_run(record)
        except ValueError:
            saved = None
        if saved and all(saved.get(k) == about.get(k) for k in ("row", "checkpoint", "task_index")):
            result = ev.EvalResult.from_dict(saved["results"][0])
            if result.settings.get("episodes_digest") == digest:
                return result
    model: torch.nn.Module
    if point.variant == PROTO:
        model = ev.ProtoBaseline()
    else:
        assert checkpoint is not None  # a row with heads has one (run_grid and the demo pass its base row's)
        heads, _ = load_heads(checkpoint)
        after_training(heads, point.after)
        model = heads
    result = ev.evaluate(
        model,
        test,
        tasks=tasks,
        seed=seed,
        split_name="test",
        device=device,
        trained=point.open_set or ev.TRAINED_SCORE,
    )
    ev.write_run(record, [result], about)
    return result


def point_compute(
    point: GridPoint, cache: FeatureCache, heads_options: Mapping[str, object], *, way: int, shot: int
) -> TaskCompute | None:
    """Parameters and forward FLOPs of the point's heads on one `way`-way `shot`-shot task with 1 query a
    class, at the cache's D, L and P (None for proto, which has no heads). `no-qc` is counted without QC;
    `gamma0` as trained, since a zero gate still computes its attention branch."""
    if point.variant == PROTO:
        return None
    options = {**heads_options, **point.heads_options()}
    if point.after == "no-qc":
        options["qc"] = False
    return task_compute(
        point.variant, cache.dim, way=way, shot=shot, queries=1, frames=cache.frames, patches=cache.patches, **options
    )


@dataclass
class GridOutcome:
    """Results per row label, the table, and where it was written."""

    points: list[GridPoint]
    results: dict[str, ev.EvalResult]
    checkpoints: dict[str, Path]
    table: pd.DataFrame
    written: list[Path]
    seconds: dict[str, float]


def run_grid(
    points: Sequence[GridPoint],
    cache: FeatureCache,
    out: Path,
    settings: TrainSettings,
    *,
    episodes: int = 10_000,
    eval_seed: int = 0,
    reference: str | None = None,
    way: int = 5,
    shot: int = 5,
    flops: bool = False,
    log: Callable[[str], None] = lambda _: None,
    train_progress: Callable[[GridPoint], Callable[[TrainProgress], None] | None] = lambda _: None,
) -> GridOutcome:
    """Train every point (runs in out/train/<row>), evaluate all on one set of test tasks (out/eval/<row>.json),
    and write out/ablation.{md,csv,png}. The reference row defaults to the first one; `flops` adds each
    row's heads GFLOPs on one task (`point_compute`) and their ratio to the reference row's."""
    out = Path(out)
    device = distributed.resolve_device(settings.device)
    reference = reference or points[0].label
    if reference not in {p.label for p in points}:
        raise ValueError(f"reference row {reference!r} is not in the grid ({', '.join(p.label for p in points)})")
    train_split = cache.load_split("train") if any(p.variant != PROTO for p in points) else None
    val_split = cache.load_split("val", views=1) if settings.val_every and "val" in cache.splits else None
    test = cache.load_split("test")
    tasks = ev.sample_tasks(test.labels, episodes=episodes, way=way, shot=shot, queries=1, seed=eval_seed)
    checkpoints: dict[str, Path] = {}
    results: dict[str, ev.EvalResult] = {}
    seconds: dict[str, float] = {}
    for point in points:
        start = time.perf_counter()
        checkpoint = None
        if point.variant != PROTO:
            base = point.trained
            if base.label not in checkpoints:
                log(f"training {base.label}")
                checkpoints[base.label] = train_point(
                    base,
                    cache,
                    out / "train" / base.slug,
                    settings,
                    train_split=train_split,
                    val_split=val_split,
                    progress=train_progress(base),
                )
            checkpoint = checkpoints[base.label]
        log(f"evaluating {point.label} on {episodes} tasks")
        results[point.label] = evaluate_point(
            point, checkpoint, test, tasks, out / "eval" / f"{point.slug}.json", seed=eval_seed, device=device
        )
        seconds[point.label] = time.perf_counter() - start
    compute = None
    if flops:
        log("counting the heads' FLOPs")
        compute = {p.label: point_compute(p, cache, settings.heads_options, way=way, shot=shot) for p in points}
    table = write_table(points, results, reference, out, checkpoints, compute)
    written = [out / TABLE, out / TABLE_CSV, out / FIGURE]
    return GridOutcome(list(points), results, checkpoints, table, written, seconds)


def write_table(
    points: Sequence[GridPoint],
    results: dict[str, ev.EvalResult],
    reference: str,
    out: Path,
    checkpoints: dict[str, Path],
    compute: Mapping[str, TaskCompute | None] | None = None,
) -> pd.DataFrame:
    """The ablation table (markdown, CSV) and its figure; returns the DataFrame. `compute` (per row label,
    None for a row without heads) adds heads_gflop and heads_flops_vs_reference, blank where either is missing."""
    ref_compute = (compute or {}).get(reference)
    about = {}
    for p in points:
        row = p.describe()
        ckpt = checkpoints.get(p.trained.label)
        if ckpt is not None:
            records = read_metrics(ckpt.parent)
            trained = [r["task"] for r in records if r.get("kind") == "train"]
            row["tasks_trained"] = max(trained) if trained else None
            row["checkpoint"] = ckpt.name
        if compute is not None:
            c = compute.get(p.label)
            row["heads_gflop"] = c.heads_flops / 1e9 if c else None
            row["heads_flops_vs_reference"] = c.heads_flops / ref_compute.heads_flops if c and ref_compute else None
        about[p.label] = row
    table = report.ablation_table(results, reference, about)
    if compute is not None:  # the cost after the accuracy it buys
        table = table[[c for c in table.columns if c not in FLOPS_COLUMNS] + list(FLOPS_COLUMNS)]
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / TABLE_CSV, index=False)
    first = results[reference].settings
    header = (
        f"# Ablation on {first.get('episodes')} identical test tasks "
        f"({first.get('way')}-way {first.get('shot')}-shot, seed {first.get('seed')}, digest {first.get('episodes_digest')})\n\n"
        f"difference: row minus `{reference}` task by task, with the paired 95% interval; "
        "tasks_better / tasks_worse: tasks where the row got more / fewer queries right.\n\n"
    )
    shown = table.drop(columns=["checkpoint"], errors="ignore")
    formats = {
        "accuracy": ".2f",
        "ci95": ".2f",
        "difference": "+.2f",
        "difference_ci95": ".2f",
        "tasks_trained": ".0f",
        "heads_gflop": ".4g",
        "heads_flops_vs_reference": ".3f",
    }
    report.write_markdown(out / TABLE, header + report.markdown_table(shown, formats))
    report.save_figure(report.ablation_figure(table, reference), out / FIGURE)
    return table
