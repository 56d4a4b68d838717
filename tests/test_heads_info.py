"""strm heads-info: the table of parameters and FLOPs runs, and its JSON rows are pipeline.compute's."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pipeline.evaluation.compute import task_compute
from pipeline.heads import build_heads
from stages.app import app

DIM, TRM_DIM = 64, 32
VARIANTS = ("strm", "trm", "jnt-st-1")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("heads_info") / "rows.json"
    result = CliRunner().invoke(
        app,
        ["heads-info", *VARIANTS, "--dim", str(DIM), "--trm-dim", str(TRM_DIM), "--queries", "1,4", "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    for variant in VARIANTS:
        assert variant in result.output
    return json.loads(out.read_text())


def test_one_row_per_variant_and_queries(rows):
    assert [(r["variant"], r["queries"]) for r in rows] == [(v, q) for q in (1, 4) for v in VARIANTS]


def test_trm_is_the_unit(rows):
    for row in rows:
        assert row["baseline"] == "trm"
        if row["variant"] == "trm":
            assert row["params_vs_baseline"] == row["heads_flops_vs_baseline"] == row["total_flops_vs_baseline"] == 1.0
        else:
            assert row["heads_flops_vs_baseline"] > 1.0


def test_counts_are_the_librarys(rows):
    for row in rows:
        heads = build_heads(row["variant"], DIM, trm_dim=TRM_DIM)
        assert row["params"] == sum(p.numel() for p in heads.parameters())
        counted = task_compute(row["variant"], DIM, queries=row["queries"], trm_dim=TRM_DIM)
        assert row["params"] == counted.params
        assert row["heads_flops"] == counted.heads_flops
        assert row["total_flops"] == counted.total_flops


@pytest.mark.parametrize(
    ("args", "message"), [(["bogus"], "unknown variant 'bogus'"), (["trm", "--queries", "0"], "--queries")]
)
def test_errors_are_one_line_with_exit_2(args, message):
    result = CliRunner().invoke(app, ["heads-info", *args, "--dim", str(DIM)])
    assert result.exit_code == 2
    assert message in result.output
