"""`strm heads-info VARIANT...`: parameters and FLOPs of heads variants on one 5-way 5-shot task, against TRM.

The paper states its compute claims relative to the TRM baseline (STRM "only ~4% additional FLOPs",
Jnt-ST's cost in Table 3); this prints them as counted by pipeline/evaluation/compute.py, heads alone and with
the ResNet-50 trunk on the task's 8-frame clips, so the claims can be checked at any feature width.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Column, Table

from pipeline.heads.variants import DEFAULT_OPTIONS, VARIANTS
from stages.common import fail

BASELINE = "trm"


def _queries(text: str) -> tuple[int, ...]:
    """'1,4' -> (1, 4); raises ValueError for anything but positive integers."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--queries {text!r}: expected positive integers such as 1,4") from None
    if not values or min(values) < 1:
        raise ValueError(f"--queries {text!r}: expected positive integers such as 1,4")
    return values


def heads_info_command(
    variants: list[str] = typer.Argument(..., help=f"Heads variants: {', '.join(VARIANTS)}."),
    dim: int = typer.Option(2048, "--dim", min=2, help="Feature width D (ResNet-50: 2048)."),
    trm_dim: int | None = typer.Option(
        None,
        "--trm-dim",
        min=1,
        help="TRM's key/value width D'. \\[default: 1152]",
    ),
    queries: str = typer.Option("1,4", "--queries", help="Query videos a class, one table block each, e.g. 1,4."),
    json_out: Path | None = typer.Option(
        None, "--json", help="Also write the rows (pipeline.evaluation.compute.compute_table) as JSON."
    ),
) -> None:
    """Parameters, heads-alone and heads + ResNet-50 trunk forward GFLOPs of one 5-way 5-shot task, and each over trm's.

    FLOPs are FlopCounterMode's: 2 x multiply-accumulates of matmuls, convolutions and attention;
    the trunk runs on (25 + 5 x queries) clips of 8 frames at 224 x 224.
    """
    from pipeline.evaluation.compute import compute_table

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        fail(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}", 2)
    try:
        rows = compute_table(
            variants, dim, queries=_queries(queries), baseline=BASELINE, **({"trm_dim": trm_dim} if trm_dim else {})
        )
    except ValueError as err:
        fail(str(err), 2)
    table = Table(
        Column("variant", no_wrap=True),
        "queries",
        "params",
        "params / trm",
        "heads GFLOP",
        "heads / trm",
        "+ trunk GFLOP",
        "total / trm",
        title=f"one 5-way 5-shot task, D={dim}, D'={trm_dim or DEFAULT_OPTIONS['trm_dim']}",
    )
    for r in rows:
        table.add_row(
            r["variant"],
            f"{r['queries']}/class",
            f"{r['params']:,}",
            f"{r['params_vs_baseline']:.3f}",
            f"{r['heads_flops'] / 1e9:.4g}",
            f"{r['heads_flops_vs_baseline']:.3f}",
            f"{r['total_flops'] / 1e9:.1f}",
            f"{r['total_flops_vs_baseline']:.4f}",
        )
    Console().print(table)
    if json_out is not None:
        try:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(rows, indent=1) + "\n")
        except OSError as err:
            fail(f"{json_out}: cannot write: {err.strerror or err}")
        typer.echo(f"wrote {json_out}")


def register(app: typer.Typer) -> None:
    """Add `strm heads-info` to the app."""
    app.command("heads-info", help=heads_info_command.__doc__)(heads_info_command)
