"""Scoring frozen heads on seeded tasks: per-video embeddings once, batched exact relating, accuracy
with 95% intervals and paired comparison, post-hoc and trained unknown scores measured on open-set tasks
(queries of actions the support does not hold), and FLOP counts.
"""

from pipeline.evaluation.batched import (
    QC_TABLE_BLOCK,
    ProtoBaseline,
    embed_split,
    evaluate,
    naive_logits,
    open_set_batch,
    qc_nearest_tables,
    qc_table_blocks,
    qc_tables_pay,
    relate_tasks,
)
from pipeline.evaluation.compute import TaskCompute, task_compute
from pipeline.evaluation.results import (
    EvalResult,
    PairedDifference,
    class_lines,
    compare_results,
    compare_runs,
    interval95,
    plot_shot_sweep,
    read_run,
    write_csv,
    write_run,
)
from pipeline.evaluation.tasks import (
    episodes_digest,
    load_episodes,
    sample_tasks,
    save_episodes,
    slice_tasks,
    task_settings,
    unknown_count,
)
from pipeline.evaluation.unknown import TRAINED_SCORE, Calibration, auto_score, calibrate, relate

__all__ = [
    "TRAINED_SCORE",
    "auto_score",
    "class_lines",
    "Calibration",
    "EvalResult",
    "PairedDifference",
    "ProtoBaseline",
    "QC_TABLE_BLOCK",
    "TaskCompute",
    "calibrate",
    "compare_results",
    "compare_runs",
    "embed_split",
    "episodes_digest",
    "evaluate",
    "interval95",
    "load_episodes",
    "naive_logits",
    "open_set_batch",
    "plot_shot_sweep",
    "qc_nearest_tables",
    "qc_table_blocks",
    "qc_tables_pay",
    "read_run",
    "relate",
    "relate_tasks",
    "sample_tasks",
    "save_episodes",
    "slice_tasks",
    "task_compute",
    "task_settings",
    "unknown_count",
    "write_csv",
    "write_run",
]
