"""Calibration on the support set itself: a temperature for probabilities, and scores that flag unknown actions.

Why leave-one-out: a person's support folder is all the labelled data there is. Classifying each
support clip against the others gives in-distribution logits with known answers, from which a
temperature T (softmax(logits / T) with the least negative log-likelihood: the heads' logits are
negative distances with gaps of tens of units, so a plain softmax says 1.0000 for anything) and
each action's typical logit follow.

The z-score keeps its promise (`--unknown P` rejects about P of the known clips) because it is
calibrated out of sample: a support clip's score comes from the OTHER clips' statistics, exactly as a
new query's comes from all of them, so the support's own scores are distributed like the queries'.
The score is the prediction-interval t statistic of the predicted action's logit (each action's own
mean, one within-action spread pooled over the actions, unbiased), mapped through Student's t to a
standard normal deviate: with Gaussian logits it is N(0, 1) for the support's held-out clips and for
new queries alike, whatever the number of clips. Spreads are floored relative to the logits' scale
(a duplicated clip cannot make one zero), duplicated clips are calibrated once, and the temperature
search is scaled to the logits (a note says when T stops at a bound).

Which score tells an action that is not in the support from one that is was measured, not assumed
(`unknown_protocol`; README "Use a trained model on your own clips"): the best raw logit, the margin
to the runner-up, the calibrated probability, the z-score above, QC's nearest-tuple distance, and
their combinations.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.evaluation import openset
from pipeline.evaluation.student import gaussian

if TYPE_CHECKING:
    from collections.abc import Callable

    from pipeline.heads import HeadsOutput

DEFAULT_SCORE = "zscore"  # the best measured on the demo's heads (README), and defined for every model
CALIBRATION_VERSION = 2  # 1: in-sample per-action z-scores (support indexes saved before out-of-sample calibration)
LOO_BUDGET = 1024  # support clips gathered at once by leave-one-out (held clips x the others): memory linear in n
SPREAD_FLOOR = (
    0.01  # a spread is at least this share of the logits' scale (std of the held-out logits); the demo's heads: 5-60%
)
T_RANGE = (1e-3, 1e3)  # the temperature is searched over this range times the logits' scale
GAUSSIAN_SCORES = ("zscore", "zscore_qc")  # N(0, 1) on known clips: thresholds are the normal quantile
TRAINED_SCORE = "trained"  # the name of a trained open-set head's score when its checkpoint does not name its method


def relate(
    model: nn.Module, support: Any, labels: torch.Tensor, query: Any, way: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(fused logits, QC logits or None) of queries against the support, in eval mode, no grad."""
    logits, qc, _ = relate_open(model, support, labels, query, way)
    return logits, qc


def relate_open(
    model: nn.Module, support: Any, labels: torch.Tensor, query: Any, way: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`relate` plus the trained open-set head's known score of each query ([n_q]; None without such a head)."""
    model.eval()
    with torch.inference_mode():
        out = cast("Callable[..., HeadsOutput]", model.relate)(support, labels, query, way)
    known = getattr(out, "known_score", None)  # stand-in models may return only logits
    return (
        out.logits.float().cpu(),
        None if out.qc_logits is None else out.qc_logits.float().cpu(),
        None if known is None else known.float().cpu(),
    )


# ---------------------------------------------------------------------------------------------- the decision


def predicted(logits: torch.Tensor) -> torch.Tensor:
    """The predicted action of each row: the arg-max of the logits, an exact tie going to the lowest index
    (what `strm evaluate` scores, and what predict, the demo and every score here use)."""
    return logits.argmax(-1)


def ranking(logits: torch.Tensor) -> torch.Tensor:
    """Actions of each row from the most to the least likely; ties keep the lower index first, so
    ranking(logits)[..., 0] == predicted(logits) always (softmax is monotone: probabilities rank alike)."""
    return torch.sort(logits, dim=-1, descending=True, stable=True).indices


@dataclass
class Decision:
    """What a query is called: the predicted action, and with a calibration its unknown score and verdict."""

    action: torch.Tensor  # [n] predicted action (arg-max of the logits)
    logit: torch.Tensor  # [n] its logit
    score: np.ndarray | None  # [n] the unknown score of that action; None without a calibration
    known: np.ndarray  # [n] bool: score >= threshold (all True without a threshold)


def decide(
    logits: torch.Tensor,
    qc: torch.Tensor | None = None,
    calibration: Calibration | None = None,
    *,
    score: str | None = None,
    threshold: float | None = None,
    known_score: torch.Tensor | None = None,
) -> Decision:
    """The one rule for predict, evaluate and the demo: the arg-max action; with a calibration, its score
    (`score`, or `auto_score`'s choice); with a threshold too, `known` is False where the score falls below
    it (labelled unknown). `known_score`: a trained open-set head's score of each query, if the model has one."""
    action = predicted(logits)
    logit = logits.gather(-1, action[..., None])[..., 0]
    value = None
    if calibration is not None:
        value = scores(logits, qc, calibration, known_score)[score or auto_score(calibration)]
    known = np.ones(len(action), dtype=bool) if value is None or threshold is None else value >= threshold
    return Decision(action, logit, value, known)


# ---------------------------------------------------------------------------------------------- leave-one-out


@dataclass
class HeldOut:
    """The support's clips that can be held out, each classified against all the other clips."""

    logits: torch.Tensor  # [m, way]
    qc: torch.Tensor | None  # [m, way] QC logits, None without QC
    known: torch.Tensor | None  # [m] a trained open-set head's known score, None without one
    truth: torch.Tensor  # [m] their actions


def leave_one_out(
    model: nn.Module, embedding: Any, labels: torch.Tensor, way: int, *, budget: int = LOO_BUDGET
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(logits [m, way], QC logits or None, true labels [m]) of `held_out`."""
    held = held_out(model, embedding, labels, way, budget=budget)
    return held.logits, held.qc, held.truth


def held_out_rows(labels: torch.Tensor, way: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(held [m]: the clips whose action has another clip, others [m, n - 1]: every clip but each of them, the
    ones after it first (cyclic), so that evaluation can take all rows as windows of the doubled support)."""
    n = len(labels)
    held = torch.nonzero(torch.bincount(labels, minlength=way)[labels] >= 2).flatten()
    return held, (held[:, None] + 1 + torch.arange(n - 1)[None]) % max(n, 1)


def held_out(model: nn.Module, embedding: Any, labels: torch.Tensor, way: int, *, budget: int = LOO_BUDGET) -> HeldOut:
    """Each support clip whose action has another clip, classified against all the others. Batched relates of
    about `budget` gathered clips each (held clips x the n - 1 others), so memory grows linearly with the
    support, not with n^2."""
    labels = labels.cpu()
    held, others = held_out_rows(labels, way)
    if not len(held):
        return HeldOut(torch.zeros(0, way), None, None, torch.zeros(0, dtype=torch.long))
    device = _device_of(embedding)
    chunk = max(1, budget // max(len(labels) - 1, 1))
    parts = []
    for start in range(0, len(held), chunk):
        rows, rest = held[start : start + chunk], others[start : start + chunk]
        parts.append(
            relate_open(
                model, embedding[rest.to(device)], labels[rest].to(device), embedding[rows[:, None].to(device)], way
            )
        )

    def joined(i: int) -> torch.Tensor | None:
        return None if any(p[i] is None for p in parts) else torch.cat([cast(torch.Tensor, p[i])[:, 0] for p in parts])

    return HeldOut(cast(torch.Tensor, joined(0)), joined(1), joined(2), labels[held])


def _device_of(embedding: Any) -> torch.device:
    return embedding.device if isinstance(embedding, torch.Tensor) else embedding.trm_k[0].device


def distinct_clips(embedding: Any, n: int) -> torch.Tensor:
    """Indices of the first of each group of identical support clips (the same file twice embeds
    identically, and would be its own leave-one-out neighbour); all of them when they cannot be compared."""
    if n < 2:
        return torch.arange(n)
    try:
        parts = [embedding] if isinstance(embedding, torch.Tensor) else [embedding.trm_v[0], embedding.trm_k[0]]
        rows = torch.cat([p.detach().reshape(n, -1).float().cpu() for p in parts], dim=1)
    except (AttributeError, IndexError, RuntimeError):
        return torch.arange(n)
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), n, dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(n), "amin"
    )
    return first.sort().values


# ---------------------------------------------------------------------------------------------- temperature


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """T > 0 minimising the negative log-likelihood of softmax(logits / T); 1 without data (see fit_temperature_noted)."""
    return fit_temperature_noted(logits, labels)[0]


def fit_temperature_noted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, str | None]:
    """(T, a note when T stopped at a bound of its search, else None).

    A search over log T, scaled to the logits (their std: T is relative to the gaps it divides, so logits
    of scale 1e5 find their T as logits of scale 1 do): a grid, then a finer grid inside the best cell,
    each evaluated in batches. The held-out labels are smoothed by Laplace's rule, one pseudo-error in
    m + 2 clips: a support whose held-out clips are all right (common with 5 clips of 5 actions) would
    otherwise drive T to 0 and every probability to 1.0000.
    """
    if len(labels) == 0:
        return 1.0, None
    logits = logits.double()
    way = logits.shape[-1]
    smoothing = way / ((way - 1) * (len(labels) + 2)) if way > 1 else 0.0  # wrong classes share 1 / (m + 2)
    target = F.one_hot(labels.long(), way).double() * (1 - smoothing) + smoothing / way
    scale = _scale(logits)

    def nll(log_t: np.ndarray) -> np.ndarray:
        out = []
        per = max(1, (1 << 20) // logits.numel())  # temperatures a batch: [per, m, way] stays near 8 MB
        for part in np.array_split(log_t, -(-len(log_t) // per)):
            t = torch.from_numpy(np.exp(part))[:, None, None]
            out.append(-((logits[None] / t).log_softmax(-1) * target).sum(-1).mean(-1))
        return torch.cat(out).numpy()

    grid = np.log(scale) + np.linspace(np.log(T_RANGE[0]), np.log(T_RANGE[1]), 241)
    at = int(np.argmin(nll(grid)))
    fine = np.clip(grid[at] + np.linspace(-0.06, 0.06, 241), grid[0], grid[-1])  # the coarse step is 0.058
    t = float(np.exp(fine[int(np.argmin(nll(fine)))]))
    if at in (0, len(grid) - 1):
        side = "smallest" if at == 0 else "largest"
        return t, (
            f"the temperature search stopped at its {side} value (T = {t:.4g}, {T_RANGE[at > 0]:g} x the "
            f"logits' scale {scale:.4g}): the support's held-out clips cannot set T, probabilities are not calibrated"
        )
    return t, None


# ---------------------------------------------------------------------------------------------- spreads


@dataclass(frozen=True)
class _Spread:
    mean: np.ndarray  # [way] each action's mean held-out value (the pooled mean for an action with none)
    std: np.ndarray  # [way] the spread its scores use: pooled within-action, floored
    count: np.ndarray  # [way] values behind the mean (n_c, or all m for the pooled mean)
    dof: np.ndarray  # [way] degrees of freedom of the spread
    support: np.ndarray  # [m] each held-out value's out-of-sample score (N(0, 1) for Gaussian values)


def _spread(values: torch.Tensor, labels: torch.Tensor, way: int, floor: float) -> _Spread:
    """Per action, mean and pooled within-action spread of its clips' held-out values, and every clip's
    score from the OTHER clips' statistics (the same formula a new query gets from all of them)."""
    x, c = values.double().numpy(), labels.numpy()
    m = len(x)
    count = np.bincount(c, minlength=way).astype(np.float64)
    sums = np.bincount(c, weights=x, minlength=way)
    mean_c = np.divide(sums, count, out=np.zeros(way), where=count > 0)
    within = float(((x - mean_c[c]) ** 2).sum())
    dof = float((count[count > 0] - 1).sum())
    grand = float(x.mean()) if m else 0.0
    total_std = math.sqrt(((x - grand) ** 2).sum() / (m - 1)) if m > 1 else 1.0
    pooled = math.sqrt(within / dof) if dof > 0 else total_std
    has = count >= 2
    mean = np.where(has, mean_c, grand)
    std = np.maximum(np.where(has, pooled, total_std), floor)
    n_eff = np.where(has, count, max(m, 1))
    dofs = np.where(has, max(dof, 1.0), max(m - 1, 1))
    support = np.zeros(m)
    if m:
        n_i = count[c]
        mean_i = (sums[c] - x) / np.maximum(n_i - 1, 1)
        within_i = within - n_i / np.maximum(n_i - 1, 1) * (x - mean_c[c]) ** 2
        dof_i = dof - 1
        std_i = np.sqrt(np.maximum(within_i, 0) / dof_i) if dof_i > 0 else np.zeros(m)
        std_i = np.maximum(std_i, floor)
        t = (x - mean_i) / (std_i * np.sqrt(1 + 1 / np.maximum(n_i - 1, 1)))
        support = gaussian(t, np.full(m, max(dof_i, 1)))
    return _Spread(mean, std, n_eff, dofs, support)


def _zscore(value: torch.Tensor, action: torch.Tensor, mean, std, count, dof, version: int) -> torch.Tensor:
    a = action.numpy()
    mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    x = value.double().numpy()
    if version < 2:  # a support index saved before out-of-sample calibration keeps its own rule
        return torch.from_numpy((x - mean[a]) / std[a])
    count, dof = np.asarray(count, dtype=np.float64), np.asarray(dof, dtype=np.float64)
    t = (x - mean[a]) / (std[a] * np.sqrt(1 + 1 / count[a]))
    return torch.from_numpy(gaussian(t, dof[a]))


# ---------------------------------------------------------------------------------------------- calibration


@dataclass
class Calibration:
    """What the support's leave-one-out gives: the temperature, each action's statistics, the clips' own
    out-of-sample scores, and notes for the caller to show."""

    temperature: float
    logit_mean: list[float]  # per action: mean logit of its own held-out clips against it
    logit_std: list[float]  # per action: the spread its z-scores use (pooled within-action, floored)
    qc_mean: list[float] | None
    qc_std: list[float] | None
    support_scores: dict[str, list[float]]  # score name -> the held-out clips' scores (known actions)
    held_clips: list[float] | None = None  # per action: held-out clips behind its mean (None before version 2)
    dof: list[float] | None = None  # per action: degrees of freedom of its spread
    notes: list[str] = field(default_factory=list)  # e.g. T stopped at a bound, duplicated clips
    version: int = 1  # CALIBRATION_VERSION for calibrations made now; 1 reads indexes saved before
    trained: str | None = None  # the name of the model's trained open-set score, when it has one

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        return cls(**d)


def calibrate(
    model: nn.Module, embedding: Any, labels: torch.Tensor, way: int, *, trained: str = TRAINED_SCORE
) -> Calibration:
    """Temperature and score statistics from the support's leave-one-out, on its distinct clips; a model
    with a trained open-set head gets its score's held-out values too, named `trained`."""
    labels = labels.cpu()
    keep = distinct_clips(embedding, len(labels))
    notes = []
    if len(keep) < len(labels):
        notes.append(
            f"{len(labels) - len(keep)} support clip(s) are exact copies of others: calibrated on the "
            f"{len(keep)} distinct clips"
        )
        embedding, labels = embedding[keep.to(_device_of(embedding))], labels[keep]
    return calibration_of(held_out(model, embedding, labels, way), way, notes, trained=trained)


def calibration_of(
    held: HeldOut, way: int, notes: list[str] | None = None, *, trained: str = TRAINED_SCORE
) -> Calibration:
    """The calibration the held-out clips give (`calibrate`'s rule, for callers that relate them themselves)."""
    logits, qc, truth = held.logits, held.qc, held.truth
    temperature, note = fit_temperature_noted(logits, truth)
    notes = [*(notes or []), *([note] if note else [])]
    rows = torch.arange(len(truth))
    own = _spread(logits[rows, truth], truth, way, SPREAD_FLOOR * _scale(logits))
    own_qc = None if qc is None else _spread(qc[rows, truth], truth, way, SPREAD_FLOOR * _scale(qc))
    calibration = Calibration(
        temperature,
        own.mean.tolist(),
        own.std.tolist(),
        None if own_qc is None else own_qc.mean.tolist(),
        None if own_qc is None else own_qc.std.tolist(),
        {},
        own.count.tolist(),
        own.dof.tolist(),
        notes,
        CALIBRATION_VERSION,
        None if held.known is None else trained,
    )
    support = scores(logits, qc, calibration, held.known)
    if len(truth):  # the z-scores from the other clips' statistics, not the clip's own
        support["zscore"] = own.support
        if own_qc is not None:
            support.update(zscore_qc=own_qc.support, zsum=own.support + own_qc.support)
    calibration.support_scores = {k: v.tolist() for k, v in support.items()}
    return calibration


def auto_score(calibration: Calibration) -> str:
    """The score `--unknown auto` uses: the model's trained open-set score when it has one with held-out
    values to set its threshold, else DEFAULT_SCORE (the best post-hoc score measured)."""
    if calibration.trained and calibration.support_scores.get(calibration.trained):
        return calibration.trained
    return DEFAULT_SCORE


def _scale(logits: torch.Tensor) -> float:
    """The logits' scale: their std over every held-out row and action (1 when there is none)."""
    value = float(logits.double().std()) if logits.numel() > 1 else 0.0
    return value if math.isfinite(value) and value > 0 else 1.0


def scores(
    logits: torch.Tensor, qc: torch.Tensor | None, calibration: Calibration, known: torch.Tensor | None = None
) -> dict[str, np.ndarray]:
    """Every score of each query (higher: more like a known action), for the predicted (arg-max) action;
    with a trained open-set head's `known` score, that one too (under calibration.trained)."""
    logits = logits.double()
    action = predicted(logits)
    rows = torch.arange(len(logits))
    top2 = logits.topk(min(2, logits.shape[-1]), dim=-1).values
    best = logits[rows, action]
    probs = (logits / calibration.temperature).softmax(-1)
    stats = (calibration.held_clips, calibration.dof, calibration.version)
    z = _zscore(best, action, calibration.logit_mean, calibration.logit_std, *stats)
    out = {
        "max_logit": best.numpy(),
        "margin": (top2[:, 0] - top2[:, -1]).numpy() if top2.shape[-1] > 1 else np.zeros(len(best)),
        "probability": probs[rows, action].numpy(),
        "zscore": z.numpy(),
    }
    if qc is not None and calibration.qc_mean is not None and calibration.qc_std is not None:
        own_qc = qc.double()[rows, action]
        qc_z = _zscore(own_qc, action, calibration.qc_mean, calibration.qc_std, *stats)
        out.update(qc=own_qc.numpy(), zscore_qc=qc_z.numpy(), zsum=(z + qc_z).numpy())
    if known is not None and calibration.trained:
        out[calibration.trained] = known.double().reshape(len(best)).numpy()
    return out


def threshold(calibration: Calibration, score: str, false_rejection: float) -> float:
    """The score below which about `false_rejection` of known clips fall.

    A z-score (N(0, 1) on known clips by construction) takes the normal quantile; any other score the
    quantile of the support's own held-out scores, at plotting position p (m + 1) so that it rejects
    p of new clips on average rather than more (the linear quantile of 10 clips at 5% rejects 13%).
    """
    values = calibration.support_scores.get(score)
    if not values:
        raise ValueError(f"no support clip could be held out for score {score!r}: every action needs 2 clips")
    if calibration.version >= 2 and score in GAUSSIAN_SCORES:
        return float(torch.special.ndtri(torch.tensor(false_rejection, dtype=torch.float64)))
    if calibration.version >= 2:
        return float(np.quantile(np.asarray(values), false_rejection, method="weibull"))
    return float(np.quantile(np.asarray(values), false_rejection))  # an index saved before keeps its rule


# ---------------------------------------------------------------------------------------------- measurement


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """Probability that a known query scores above an unknown one (ties count half): the Mann-Whitney AUROC."""
    return float(openset.auroc(np.ravel(known), np.ravel(unknown))[0])


def unknown_protocol(
    model: nn.Module,
    embedding: Any,
    labels: np.ndarray,
    *,
    known: int = 5,
    shots: int = 5,
    unknown: int = 5,
    draws: int = 40,
    seed: int = 0,
    false_rejection: float = 0.05,
) -> dict[str, dict]:
    """Known-vs-unknown separation of every score on cached features of one split (`embedding` of all its videos).

    Each draw: `known` actions with `shots` support clips each, their other clips as known queries,
    every clip of `unknown` other actions as unknown queries. Per score: the mean AUROC over draws,
    the catch rate (unknown queries flagged) at the threshold that rejects exactly `false_rejection`
    of the known queries (oracle), and with the threshold calibrated on the support's leave-one-out
    (what `--unknown auto` does) its catch rate and the false rejection it really gives.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = {int(c): np.flatnonzero(labels == c) for c in classes}
    eligible = [c for c in by_class if len(by_class[c]) > shots]
    if len(eligible) < known or len(classes) < known + unknown:
        raise ValueError(f"the split needs {known} actions with more than {shots} clips and {known + unknown} actions")
    sums: dict[str, dict[str, list[float]]] = {}
    device = _device_of(embedding)
    for _ in range(draws):
        chosen = rng.choice(eligible, known, replace=False)
        rest = rng.choice([c for c in by_class if c not in set(chosen.tolist())], unknown, replace=False)
        support, support_labels, queries = [], [], []
        for label, c in enumerate(chosen):
            picks = rng.permutation(by_class[int(c)])
            support += picks[:shots].tolist()
            support_labels += [label] * shots
            queries += picks[shots:].tolist()
        outsiders = [int(v) for c in rest for v in by_class[int(c)]]
        s_idx, s_lab = torch.tensor(support, device=device), torch.tensor(support_labels, device=device)
        calibration = calibrate(model, embedding[s_idx], s_lab, known)
        q_idx = torch.tensor(queries + outsiders, device=device)
        logits, qc = relate(model, embedding[s_idx], s_lab, embedding[q_idx], known)
        for name, v in scores(logits, qc, calibration).items():
            inside, outside = v[: len(queries)], v[len(queries) :]
            oracle = np.quantile(inside, false_rejection)
            auto = threshold(calibration, name, false_rejection)
            row = sums.setdefault(name, {"auroc": [], "catch_oracle": [], "catch_auto": [], "false_rejection_auto": []})
            row["auroc"].append(auroc(inside, outside))
            row["catch_oracle"].append(float((outside < oracle).mean()))
            row["catch_auto"].append(float((outside < auto).mean()))
            row["false_rejection_auto"].append(float((inside < auto).mean()))
    return {name: {k: float(np.mean(v)) for k, v in row.items()} for name, row in sums.items()}
