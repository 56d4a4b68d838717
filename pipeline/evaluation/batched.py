"""Episodic evaluation of frozen heads on cached features: exact, batched over tasks, with intervals.

Why this shape: every block of the heads works on one video at a time until the cross-video step
(TRM's attention over a class's tuples, QC's min-distance), so a frozen model's per-video outputs
are computed once per split (`embed_split`) and each task only gathers its videos' embeddings and
runs `heads.relate`, many tasks at a time (`relate_tasks`). When the tasks cover the split's video
pairs densely, QC's nearest-tuple distances come from one table of all pairs instead
(`qc_nearest_tables`). That equals the naive per-task forward (`naive_logits`) up to float
rounding; the tests hold it to 1e-4 relative.

Accuracy is reported as the field does (STRM_SPEC section 10): the mean over tasks of each task's
query accuracy, with a 95% interval 1.96 * std / sqrt(n) (population std). Tasks come from
`pipeline.data.episodes`, so one seed gives the same tasks to every model and two runs can be compared
task by task (`compare_runs`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from pipeline.data.episodes import Task, TaskBatch
from pipeline.evaluation import unknown
from pipeline.evaluation.openset import open_set_metrics
from pipeline.evaluation.results import EvalResult, _score
from pipeline.evaluation.tasks import (
    episodes_digest,
    sample_tasks,
    slice_tasks,
    task_settings,
    unknown_count,
)
from pipeline.evaluation.unknown import TRAINED_SCORE, HeldOut, predicted
from pipeline.heads import VideoEmbedding
from pipeline.heads.qc import nearest_block

if TYPE_CHECKING:
    from pipeline.features.readers import SplitReader
    from pipeline.heads import HeadsOutput


Progress = Callable[[str, int, int], None]  # (phase "embed" | "qc table" | "tasks", done, total)


# ----------------------------------------------------------------------------------------------
# The two ways to get a task's logits: per video once then batched tasks, or the naive forward.


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Mixed precision where asked: float16 on CUDA, bfloat16 elsewhere (torch's defaults)."""
    return torch.autocast(device.type, enabled=enabled) if enabled else contextlib.nullcontext()


# Videos per `encode` call. On CPU 16 keeps PLE's [16*8*16, 3D] activations (25 MB) near the
# cache, and the calls run as one single-threaded stream per core (`_cpu_streams`): 19.6 ms a
# video at D = 2048 on the 2-core bench machine, against 23.3 ms with both cores inside each call
# and 28.1 ms in calls of 64.
CPU_EMBED_BATCH = 16
DEVICE_EMBED_BATCH = 256


def embed_split(
    heads: nn.Module,
    features: torch.Tensor | SplitReader,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    *,
    autocast: bool = False,
    progress: Progress | None = None,
) -> VideoEmbedding:
    """The per-video pass: `heads.encode` over features [N, L, P, D] (one view), or view 0 of a split
    however it is loaded (cache.FeatureCache.split), in eval mode, no grad."""
    device = torch.device(device)
    if batch_size is None:
        batch_size = CPU_EMBED_BATCH if device.type == "cpu" else DEVICE_EMBED_BATCH
    heads.eval()
    n = len(features)

    def chunk(start: int) -> torch.Tensor:
        if isinstance(features, torch.Tensor):
            return features[start : start + batch_size]
        videos = np.arange(start, min(start + batch_size, n))
        return features.read(videos, np.zeros(len(videos), dtype=np.int64))

    def encode(start: int) -> Any:
        with torch.inference_mode(), _autocast(device, autocast):  # both are per thread
            return cast("Callable[..., Any]", heads.encode)(
                chunk(start).to(device=device, dtype=torch.float32, non_blocking=True)
            )

    parts = []
    with _cpu_streams(device) as streams:
        for part in streams(encode, range(0, n, batch_size)):
            parts.append(part)
            if progress:
                progress("embed", min(len(parts) * batch_size, n), n)
    return _cat(parts)


def _cat(parts: list[Any]) -> Any:
    """Concatenate per-batch embeddings along the video dimension (a tensor or a VideoEmbedding)."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return type(parts[0]).cat(parts)


def relate_tasks(
    heads: nn.Module,
    embedding: Any,
    tasks: TaskBatch,
    device: str | torch.device = "cpu",
    *,
    autocast: bool = False,
    qc_tables: Sequence[torch.Tensor] | None = None,
) -> HeadsOutput:
    """Logits [B, n_q, way] of a batch of tasks from the split's per-video embedding (and, when given,
    the split's QC tables from `qc_nearest_tables`, which QC then reads instead of its tuples)."""
    device = torch.device(device)
    way = tasks.classes.shape[1]
    support = torch.as_tensor(tasks.support, device=device)
    query = torch.as_tensor(tasks.query, device=device)
    labels = torch.as_tensor(tasks.support_labels, device=device)
    with torch.inference_mode(), _autocast(device, autocast):
        if qc_tables is None:
            return cast("Callable[..., HeadsOutput]", heads.relate)(embedding[support], labels, embedding[query], way)
        nearest = [table[query[:, :, None], support[:, None, :]] for table in qc_tables]  # [B, n_q, n_s, T]
        return cast("Callable[..., HeadsOutput]", heads.relate)(
            embedding[support], labels, embedding[query], way, qc_nearest=nearest
        )


# QC's table: each block of `qc.nearest_block` multiplies the tuples of 32 videos with those of 32
# others ([32*T]^2 distances, 3.2 MB at T = 28, near the cache) and serves both directions, so the
# table makes N^2/2 video pairs' products. Evaluation uses it when that is no more than its tasks
# make (every (query, support) pair of every task) and the table fits in QC_TABLE_MAX_BYTES; its
# products then run as large matmuls with no gathering (HMDB51's test split: 1,292 videos, 187 MB,
# against 1.25 M pairs in 10,000 5-way 5-shot tasks).
QC_TABLE_BLOCK = 32
QC_TABLE_MAX_BYTES = 1 << 30


def qc_tables_pay(embedding: Any, tasks: TaskBatch) -> bool:
    """Whether evaluating `tasks` should read QC from `qc_nearest_tables` (see QC_TABLE_BLOCK); open-set tasks
    also relate each support clip to the others (calibration)."""
    if not isinstance(embedding, VideoEmbedding) or not embedding.qc:
        return False
    n, n_s = len(embedding), tasks.support.shape[1]
    table_bytes = sum(n * n * norms.shape[1] * 4 for norms in embedding.qc_norms)
    queries = tasks.open_queries()[0].shape[1] + (n_s - 1 if unknown_count(tasks) else 0)  # open set: LOO too
    pairs = len(tasks) * queries * n_s
    return table_bytes <= QC_TABLE_MAX_BYTES and n * n / 2 <= pairs


def qc_table_blocks(n_videos: int) -> list[tuple[slice, slice]]:
    """The blocks of videos (a, b), a at or before b, whose products fill the table both ways."""
    starts = range(0, n_videos, QC_TABLE_BLOCK)
    return [(slice(i, i + QC_TABLE_BLOCK), slice(j, j + QC_TABLE_BLOCK)) for i in starts for j in starts if j >= i]


def qc_nearest_tables(
    embedding: VideoEmbedding,
    device: str | torch.device = "cpu",
    *,
    autocast: bool = False,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, ...]:
    """Per cardinality, [N, N, T]: entry (q, s, t) is the squared distance from tuple t of video q to
    its nearest tuple of video s, for every ordered pair of the split's videos."""
    device = torch.device(device)
    n = len(embedding)
    with torch.inference_mode():
        tables = tuple(torch.empty(n, n, norms.shape[1], device=norms.device) for norms in embedding.qc_norms)
    jobs = [(c, a, b) for c in range(len(tables)) for a, b in qc_table_blocks(n)]

    def fill(job: tuple[int, slice, slice]) -> None:
        c, a, b = job
        z, norms = embedding.qc[c], embedding.qc_norms[c]
        with torch.inference_mode(), _autocast(device, autocast):
            a_to_b, b_to_a = nearest_block(z[a], norms[a], z[b], norms[b])
            tables[c][a, b] = a_to_b
            if a != b:  # a diagonal block's other direction is itself
                tables[c][b, a] = b_to_a

    with _cpu_streams(device) as streams:
        for done, _ in enumerate(streams(fill, jobs), 1):
            if progress:
                progress("qc table", done, len(jobs))
    return tables


def naive_logits(
    heads: nn.Module, features: torch.Tensor, task: Task, device: str | torch.device = "cpu"
) -> HeadsOutput:
    """The reference: one task through the whole forward, `heads(support, labels, query)`, in eval mode."""
    device = torch.device(device)
    heads.eval()
    with torch.inference_mode():
        support = features[torch.as_tensor(task.support)].to(device, torch.float32)
        query = features[torch.as_tensor(task.query)].to(device, torch.float32)
        return heads(support, torch.as_tensor(task.support_labels, device=device), query)


# ----------------------------------------------------------------------------------------------
# The parameter-free baseline, shaped like the heads so the same exact, batched path runs it.


class ProtoBaseline(nn.Module):
    """Nearest class mean of temporally concatenated frame features: the floor any model must beat.

    A frame's feature is the mean of its patches; a video is its frames concatenated [L*D]; a class
    is the mean of its support videos; logits are minus squared Euclidean distances.
    """

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(dim=-2).flatten(-2)

    def relate(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, way: int) -> HeadsOutput:
        from pipeline.heads import HeadsOutput

        onehot = nn.functional.one_hot(support_labels, way).to(support.dtype)  # [..., n_s, way]
        prototypes = onehot.transpose(-1, -2) @ support / onehot.sum(-2).unsqueeze(-1)
        # Direct differences, not the matmul expansion: batched and per-task runs then agree closely.
        logits = -torch.cdist(query, prototypes, compute_mode="donot_use_mm_for_euclid_dist").square()
        return HeadsOutput(logits=logits, trm_logits=logits, qc_logits=None)

    def forward(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor) -> HeadsOutput:
        way = int(support_labels.max()) + 1
        return self.relate(self.encode(support), support_labels, self.encode(query), way)


def _default_batch_tasks(embedding: Any, n_videos: int, videos_per_task: int) -> int:
    """Tasks a batch so its gathered embeddings stay near 16 MB (2 tasks at D = 2048): on the 2-core
    bench machine one stream ran 1 or 2 tasks a call ~10% faster than 4 (what a call gathers is
    still in cache when the products read it), and 1 no faster than 2 with two streams sharing
    Python; small D gets up to 512."""
    tensors = [embedding] if isinstance(embedding, torch.Tensor) else list(_tensors(embedding))
    per_video = sum(t.element_size() * t.numel() for t in tensors) / max(n_videos, 1)
    return int(max(1, min(512, (16 << 20) // max(per_video * videos_per_task, 1))))


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor an embedding holds (dataclass fields, tuples, lists, dicts)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            yield from _tensors(getattr(obj, name))


def evaluate(
    heads: nn.Module,
    split: SplitReader,
    *,
    episodes: int = 10_000,
    way: int = 5,
    shot: int = 5,
    queries: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_tasks: int | None = None,
    progress: Progress | None = None,
    tasks: TaskBatch | None = None,
    embedding: Any = None,
    split_name: str = "",
    autocast: bool = False,
    trained: str = TRAINED_SCORE,
) -> EvalResult:
    """Accuracy of frozen `heads` on `episodes` tasks of `split` (view 0), batched over tasks.

    `tasks` replaces sampling (a loaded episodes file; way/shot/queries/episodes come from it);
    `embedding` reuses a per-video pass (`embed_split`) across settings, e.g. a sweep of shots.
    Predictions are the argmax of `logits` (TRM + lambda * QC, or TRM alone without QC). Tasks with
    unknown queries (open set) also measure every unknown score (named `trained` for a trained open-set
    head's) on them: `result.open_set`.
    """
    device = torch.device(device)
    if tasks is None:
        tasks = sample_tasks(split.labels, episodes=episodes, way=way, shot=shot, queries=queries, seed=seed)
    settings = {"split": split_name, **task_settings(tasks), "seed": seed}
    settings["episodes_digest"] = episodes_digest(tasks, split.video_ids)
    settings["autocast"] = autocast
    if embedding is None:
        embedding = embed_split(heads, split, device=device, autocast=autocast, progress=progress)
    qc_tables = None
    if qc_tables_pay(embedding, tasks):
        qc_tables = qc_nearest_tables(embedding, device, autocast=autocast, progress=progress)
        embedding = replace(embedding, qc=(), qc_norms=())  # the tasks no longer read the QC tuples
    if batch_tasks is None:
        videos = tasks.support.shape[1] + tasks.open_queries()[0].shape[1]  # unknown queries included
        batch_tasks = _default_batch_tasks(embedding, len(split.labels), videos)
    chosen = np.empty(tasks.query.shape, dtype=np.int64)  # task labels 0..way-1
    open_set = unknown_count(tasks) > 0
    found: dict[str, np.ndarray] = {}  # open set: score name -> [tasks, known + unknown queries], then thresholds

    def predict(start: int) -> tuple[int, np.ndarray, dict[str, np.ndarray]]:
        batch = slice_tasks(tasks, slice(start, start + batch_tasks))
        if open_set:
            return start, *open_set_batch(
                heads, embedding, batch, device, autocast=autocast, qc_tables=qc_tables, trained=trained, start=start
            )
        logits = relate_tasks(heads, embedding, batch, device, autocast=autocast, qc_tables=qc_tables).logits
        _check_finite(logits, start)
        return start, predicted(logits).cpu().numpy(), {}  # the one rule for the predicted action

    starts = range(0, len(tasks), batch_tasks)
    with _cpu_streams(device) as streams:
        for start, labels, values in streams(predict, starts):
            chosen[start : start + len(labels)] = labels
            for name, v in values.items():
                found.setdefault(name, np.empty((len(tasks), *v.shape[1:])))[start : start + len(v)] = v
            if progress:
                progress("tasks", start + len(labels), len(tasks))
    result = _score(tasks, chosen, split, settings)
    if open_set:
        result.open_set, result.open_set_info = _measure(found, chosen == tasks.query_labels, trained)
    return result


def _check_finite(logits: torch.Tensor, start: int) -> None:
    if not torch.isfinite(logits).all():  # an argmax over NaN would score silently
        raise ValueError(
            f"the logits of tasks {start}-{start + len(logits) - 1} are not finite (NaN or inf): the heads' "
            "weights or the split's features hold NaN or inf (a diverged checkpoint? `strm cache info` the cache)"
        )


# ----------------------------------------------------------------------------------------------
# The open-set protocol: unknown queries are more queries of the same batch; each task's support is
# calibrated by leave-one-out (`unknown.calibration_of`, the rule predict uses), its clips related to
# the others in one call a task.

FALSE_REJECTION = 0.05  # the known queries' false rejection the catch rates are measured at


def open_set_batch(
    heads: nn.Module,
    embedding: Any,
    batch: TaskBatch,
    device: torch.device,
    *,
    autocast: bool = False,
    qc_tables: Sequence[torch.Tensor] | None = None,
    trained: str = TRAINED_SCORE,
    start: int = 0,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(predicted labels of the known queries [B, n_known], every score of every query [B, n_known +
    n_unknown] and, as "threshold:<score>", each task's calibrated threshold [B] (NaN where none can be set))."""
    videos = batch.open_queries()[0]
    out = relate_tasks(heads, embedding, replace(batch, query=videos), device, autocast=autocast, qc_tables=qc_tables)
    _check_finite(out.logits, start)
    held = _held_out_tasks(heads, embedding, batch, device, autocast=autocast, qc_tables=qc_tables)
    way, rows = batch.classes.shape[1], []
    for b in range(len(batch)):
        cal = unknown.calibration_of(held[b], way, trained=trained)
        qc, known = (None if t is None else t[b].float().cpu() for t in (out.qc_logits, out.known_score))
        values = unknown.scores(out.logits[b].float().cpu(), qc, cal, known)
        for name in list(values):
            can = bool(cal.support_scores.get(name))
            values[f"threshold:{name}"] = np.float64(unknown.threshold(cal, name, FALSE_REJECTION) if can else np.nan)
        rows.append(values)
    stacked = {name: np.stack([r[name] for r in rows]) for name in rows[0]}
    return predicted(out.logits[:, : batch.query.shape[1]]).cpu().numpy(), stacked


def _held_out_tasks(
    heads: nn.Module,
    embedding: Any,
    batch: TaskBatch,
    device: torch.device,
    *,
    autocast: bool,
    qc_tables: Sequence[torch.Tensor] | None,
) -> list[HeldOut]:
    """Each task's support clips held out one at a time (`unknown.held_out_rows`): per task one relate of its
    n clips against the n - 1 others, taken as windows of the support written twice (views: only the heads'
    grouping by class copies them; gathering every row's support instead made evaluation 1.7x slower)."""
    way, n = batch.classes.shape[1], batch.support.shape[1]
    labels = torch.as_tensor(batch.support_labels[0])
    if (batch.support_labels != batch.support_labels[:1]).any():
        raise ValueError("open-set evaluation needs every task's support in one label order")
    held, others = unknown.held_out_rows(labels, way)
    if len(held) < n:  # equal shots: every clip is held out, or (one shot) none
        return [HeldOut(torch.zeros(0, way), None, None, torch.zeros(0, dtype=torch.long))] * len(batch)

    def windows(t: torch.Tensor) -> torch.Tensor:  # [n, ..] -> [n, n - 1, ..]: row i = the clips after i, cyclic
        twice, stride = torch.cat([t, t]), t.stride()
        return twice.as_strided((n, n - 1, *t.shape[1:]), (stride[0], *stride), twice.storage_offset() + stride[0])

    out = []
    for b in range(len(batch)):
        ids = torch.as_tensor(batch.support[b], device=device)
        support = embedding[ids]
        rest = support._map(windows) if isinstance(support, VideoEmbedding) else windows(support)
        itself = support._map(lambda t: t[:, None]) if isinstance(support, VideoEmbedding) else support[:, None]
        options = {}
        if qc_tables is not None:
            options["qc_nearest"] = [
                table[ids[:, None, None], ids[others.to(device)][:, None, :]] for table in qc_tables
            ]
        with torch.inference_mode(), _autocast(device, autocast):
            got = cast("Callable[..., HeadsOutput]", heads.relate)(
                rest, labels[others].to(device), itself, way, **options
            )
        qc, known = got.qc_logits, getattr(got, "known_score", None)
        out.append(
            HeldOut(
                got.logits[:, 0].float().cpu(),
                None if qc is None else qc[:, 0].float().cpu(),
                None if known is None else known[:, 0].float().cpu(),
                labels[held],
            )
        )
    return out


def _measure(
    found: dict[str, np.ndarray], correct: np.ndarray, trained: str
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """Per score, every open-set measure's per-task values (openset.open_set_metrics), and which score and
    threshold `--unknown auto` uses."""
    n_known = correct.shape[1]
    measured: dict[str, dict[str, np.ndarray]] = {}
    for name, values in found.items():
        if name.startswith("threshold:"):
            continue
        cut = found[f"threshold:{name}"]
        metrics = open_set_metrics(
            values[:, :n_known],
            values[:, n_known:],
            correct,
            rate=FALSE_REJECTION,
            threshold=cut if np.isfinite(cut).all() else None,
        )
        measured[name] = {k: m.per_task for k, m in metrics.items()}
    auto = (
        trained if trained in measured and np.isfinite(found[f"threshold:{trained}"]).all() else unknown.DEFAULT_SCORE
    )
    cut = found[f"threshold:{auto}"]
    info = {
        "false_rejection": FALSE_REJECTION,
        "auto": {
            "score": auto,
            "threshold": "calibrated on each task's support (leave-one-out), for a false rejection of "
            f"{FALSE_REJECTION:g}",
            "threshold_mean": float(np.nanmean(cut)) if np.isfinite(cut).any() else None,
            "threshold_range": [float(np.nanmin(cut)), float(np.nanmax(cut))] if np.isfinite(cut).any() else None,
        },
    }
    return measured, info


@contextlib.contextmanager
def _cpu_streams(device: torch.device) -> Iterator[Callable]:
    """How chunks of work (videos to encode, batches of tasks) run: on CPU, one single-threaded
    stream per core; elsewhere one stream. Yields a `map` that returns results in order.

    A task's ops are small (products of a few hundred rows of width 1152): split across cores inside
    each op they spend much of their time in OpenMP barriers, and on a shared machine several times their
    CPU time spinning. Even encode's large products run 1.2x faster as one call per core than
    split across cores. Whole chunks on separate threads (ops release the GIL) keep every core busy.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield map
        return
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads, initializer=_single_threaded_worker) as pool:
            yield pool.map
    finally:
        torch.set_num_threads(threads)


def _single_threaded_worker() -> None:
    """Per-thread settings of a CPU stream: one BLAS thread (a new thread's BLAS would otherwise use
    every core), and subnormal floats flushed to zero. Where TRM's attention is very peaked, many
    support tuples get weights below 1e-38, and products with such subnormals ran 20x slower here
    (26.7 ms against 1.2 ms a task for the prototypes, on scores of that spread); flushing changes
    a logit by < 1e-30. The demo's trained model is not that peaked (no difference)."""
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
