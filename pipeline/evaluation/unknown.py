"""Calibration on the support set itself: a temperature for probabilities, and scores that flag unknown actions.

Why leave-one-out: a person's support folder is all the labelled data there is. Classifying each
support clip against the others gives in-distribution logits with known answers, from which a
temperature T (softmax(logits / T) with the least negative log-likelihood: the heads' logits are
negative distances with gaps of tens of units, so a plain softmax says 1.0000 for anything) and
each action's own spread of scores (for a threshold that rejects about P of its own clips) follow.

Which score tells an action that is not in the support from one that is was measured, not assumed
(`unknown_protocol`; README "Use a trained model on your own clips"): the best raw logit, the margin
to the runner-up, the calibrated probability, each logit as a z-score within its action's own
leave-one-out spread, QC's nearest-tuple distance, and their combinations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from collections.abc import Callable

    from pipeline.heads import HeadsOutput

DEFAULT_SCORE = "zscore"  # the best measured on the demo's heads (README), and defined for every model


def relate(
    model: nn.Module, support: Any, labels: torch.Tensor, query: Any, way: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(fused logits, QC logits or None) of queries against the support, in eval mode, no grad."""
    model.eval()
    with torch.inference_mode():
        out = cast("Callable[..., HeadsOutput]", model.relate)(support, labels, query, way)
    return out.logits.float().cpu(), None if out.qc_logits is None else out.qc_logits.float().cpu()


def leave_one_out(
    model: nn.Module, embedding: Any, labels: torch.Tensor, way: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Each support clip whose action has another clip, classified against all the others: (logits [m, way],
    QC logits or None, true labels [m]). One batched relate: every task holds all clips but one."""
    labels = labels.cpu()
    n = len(labels)
    counts = torch.bincount(labels, minlength=way)
    held = [i for i in range(n) if counts[labels[i]] >= 2]
    if not held:
        return torch.zeros(0, way), None, torch.zeros(0, dtype=torch.long)
    others = torch.tensor([[j for j in range(n) if j != i] for i in held])
    queries = torch.tensor(held)[:, None]
    device = _device_of(embedding)
    logits, qc = relate(
        model, embedding[others.to(device)], labels[others].to(device), embedding[queries.to(device)], way
    )
    return logits[:, 0], None if qc is None else qc[:, 0], labels[held]


def _device_of(embedding: Any) -> torch.device:
    return embedding.device if isinstance(embedding, torch.Tensor) else embedding.trm_k[0].device


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """T > 0 minimising the negative log-likelihood of softmax(logits / T) (a search over log T); 1 without data.

    The held-out labels are smoothed by Laplace's rule, one pseudo-error in m + 2 clips: a support whose
    held-out clips are all right (common with 5 clips of 5 actions) would otherwise drive T to 0 and
    every probability to 1.0000.
    """
    if len(labels) == 0:
        return 1.0
    logits = logits.double()
    way = logits.shape[-1]
    smoothing = way / ((way - 1) * (len(labels) + 2)) if way > 1 else 0.0  # wrong classes share 1 / (m + 2)

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / np.exp(log_t), labels, label_smoothing=smoothing))

    grid = np.linspace(np.log(1e-3), np.log(1e4), 281)
    best = grid[int(np.argmin([nll(x) for x in grid]))]
    lo, hi = best - 0.05, best + 0.05  # then golden-section search inside the best grid cell
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        lo, hi = (lo, b) if nll(a) < nll(b) else (a, hi)
    return float(np.exp((lo + hi) / 2))


def _spread(values: torch.Tensor, labels: torch.Tensor, way: int) -> tuple[np.ndarray, np.ndarray]:
    """Per action, the mean and std of its own clips' values; the pooled ones where it has fewer than 2."""
    array, classes = values.double().numpy(), labels.numpy()
    pooled_mean = float(array.mean()) if len(array) else 0.0
    pooled_std = float(array.std()) if len(array) > 1 else 1.0
    mean, std = np.full(way, pooled_mean), np.full(way, max(pooled_std, 1e-6))
    for c in range(way):
        own = array[classes == c]
        if len(own) >= 2:
            mean[c], std[c] = own.mean(), max(own.std(), 1e-6)
    return mean, std


@dataclass
class Calibration:
    """What the support's leave-one-out gives: the temperature, each action's spread, the clips' own scores."""

    temperature: float
    logit_mean: list[float]  # per action: mean logit of its own held-out clips against it
    logit_std: list[float]
    qc_mean: list[float] | None
    qc_std: list[float] | None
    support_scores: dict[str, list[float]]  # score name -> the held-out clips' scores (known actions)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        return cls(**d)


def calibrate(model: nn.Module, embedding: Any, labels: torch.Tensor, way: int) -> Calibration:
    """Temperature and score spreads from the support's leave-one-out."""
    logits, qc, truth = leave_one_out(model, embedding, labels, way)
    temperature = fit_temperature(logits, truth)
    rows = torch.arange(len(truth))
    mean, std = _spread(logits[rows, truth], truth, way)
    qc_mean = qc_std = None
    if qc is not None:
        qc_mean, qc_std = _spread(qc[rows, truth], truth, way)
    partial = Calibration(
        temperature,
        mean.tolist(),
        std.tolist(),
        None if qc_mean is None else qc_mean.tolist(),
        None if qc_std is None else qc_std.tolist(),
        {},
    )
    partial.support_scores = {k: v.tolist() for k, v in scores(logits, qc, partial).items()}
    return partial


def scores(logits: torch.Tensor, qc: torch.Tensor | None, calibration: Calibration) -> dict[str, np.ndarray]:
    """Every score of each query (higher: more like a known action), for the predicted (arg-max) action."""
    logits = logits.double()
    predicted = logits.argmax(-1)
    rows = torch.arange(len(logits))
    top2 = logits.topk(min(2, logits.shape[-1]), dim=-1).values
    best = top2[:, 0]
    probs = (logits / calibration.temperature).softmax(-1)
    mean, std = torch.tensor(calibration.logit_mean), torch.tensor(calibration.logit_std)
    z = (best - mean[predicted]) / std[predicted]
    out = {
        "max_logit": best.numpy(),
        "margin": (top2[:, 0] - top2[:, -1]).numpy() if top2.shape[-1] > 1 else np.zeros(len(best)),
        "probability": probs[rows, predicted].numpy(),
        "zscore": z.numpy(),
    }
    if qc is not None and calibration.qc_mean is not None:
        qc = qc.double()
        qc_z = (qc[rows, predicted] - torch.tensor(calibration.qc_mean)[predicted]) / torch.tensor(calibration.qc_std)[
            predicted
        ]
        out.update(qc=qc[rows, predicted].numpy(), zscore_qc=qc_z.numpy(), zsum=(z + qc_z).numpy())
    return out


def threshold(calibration: Calibration, score: str, false_rejection: float) -> float:
    """The score below which about `false_rejection` of the support's own held-out clips fall."""
    values = calibration.support_scores.get(score)
    if not values:
        raise ValueError(f"no support clip could be held out for score {score!r}: every action needs 2 clips")
    return float(np.quantile(np.asarray(values), false_rejection))


# ---------------------------------------------------------------------------------------------- measurement


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """Probability that a known query scores above an unknown one (ties count half): the Mann-Whitney AUROC."""
    known, unknown = np.asarray(known, dtype=np.float64), np.asarray(unknown, dtype=np.float64)
    greater = (known[:, None] > unknown[None, :]).sum()
    ties = (known[:, None] == unknown[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(known) * len(unknown)))


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
        device = _device_of(embedding)
        s_idx, s_lab = torch.tensor(support, device=device), torch.tensor(support_labels, device=device)
        calibration = calibrate(model, embedding[s_idx], s_lab, known)
        q_idx = torch.tensor(queries + outsiders, device=device)
        logits, qc = relate(model, embedding[s_idx], s_lab, embedding[q_idx], known)
        values = scores(logits, qc, calibration)
        for name, v in values.items():
            inside, outside = v[: len(queries)], v[len(queries) :]
            oracle = np.quantile(inside, false_rejection)
            auto = threshold(calibration, name, false_rejection)
            row = sums.setdefault(name, {"auroc": [], "catch_oracle": [], "catch_auto": [], "false_rejection_auto": []})
            row["auroc"].append(auroc(inside, outside))
            row["catch_oracle"].append(float((outside < oracle).mean()))
            row["catch_auto"].append(float((outside < auto).mean()))
            row["false_rejection_auto"].append(float((inside < auto).mean()))
    return {name: {k: float(np.mean(v)) for k, v in row.items()} for name, row in sums.items()}
