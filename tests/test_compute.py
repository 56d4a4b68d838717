"""FLOP and parameter accounting (pipeline/evaluation/compute.py), on small heads: counts against hand formulas,
linearity in the queries, determinism, the table, and the training-step count the heads bench uses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.evaluation.compute import (
    compute_table,
    count_flops,
    random_task,
    task_compute,
    training_step_flops,
    trunk_per_frame,
)
from pipeline.heads import build_heads

DIM, FRAMES, PATCHES, TRM_DIM = 16, 8, 4, 12
SMALL = {"frames": FRAMES, "patches": PATCHES, "trm_dim": TRM_DIM}


def heads_flops(variant: str, queries: int = 1, **kwargs) -> int:
    return task_compute(variant, DIM, queries=queries, **SMALL, **kwargs).heads_flops


def test_trunk_matches_resnet50s_published_cost():
    """ResNet-50 is 4.1 GMACs at 224 x 224 and 25,557,032 parameters, 2,049,000 of them in fc."""
    params, flops = trunk_per_frame(224)
    assert params == 25_557_032 - 2_049_000
    assert 4.0e9 < flops / 2 < 4.2e9  # FlopCounterMode counts 2 FLOPs a multiply-accumulate


def test_cpu_attention_is_counted():
    """FlopCounterMode alone counts 0 for CPU scaled_dot_product_attention; both products must count."""
    q = torch.randn(3, 10, 8, requires_grad=True)
    assert count_flops(lambda: F.scaled_dot_product_attention(q, q, q)) == 2 * (2 * 3 * 10 * 10 * 8)
    assert count_flops(lambda: F.scaled_dot_product_attention(q, q, q).sum().backward()) > 3 * 2 * (2 * 3 * 10 * 10 * 8)


@pytest.mark.parametrize("way, shot, queries", [(5, 5, 1), (3, 2, 4)])
def test_enrichment_costs_by_hand(way, shot, queries):
    """Adding PLE or Jnt-ST to TRM costs exactly their blocks' products, from the layer shapes:
    per token sequence of length T, Q|K|V 2*T*D*3D, attention 2 * 2*T*T*D, psi 2*T*(D*h + h*h + h*D)."""
    videos, h = way * (shot + queries), DIM // 2

    def block(tokens: int) -> int:
        return 2 * tokens * DIM * 3 * DIM + 2 * 2 * tokens * tokens * DIM + 2 * tokens * (DIM * h + h * h + h * DIM)

    task = {"way": way, "shot": shot, "queries": queries}
    trm = heads_flops("trm", **task)
    assert heads_flops("ple-trm", **task) - trm == videos * FRAMES * block(PATCHES)  # PLE: per frame, P tokens
    assert heads_flops("jnt-st-1", **task) - trm == videos * block(FRAMES * PATCHES)  # one sequence of L*P tokens
    assert heads_flops("jnt-st-2", **task) - trm == 2 * videos * block(FRAMES * PATCHES)


@pytest.mark.parametrize("variant", ["trm", "strm", "jnt-st-1", "trx"])
def test_flops_linear_in_queries(variant):
    one, two, four = (task_compute(variant, DIM, queries=q, **SMALL) for q in (1, 2, 4))
    assert two.heads_flops > one.heads_flops
    assert four.heads_flops - one.heads_flops == 3 * (two.heads_flops - one.heads_flops)
    assert four.trunk_flops - one.trunk_flops == 3 * (two.trunk_flops - one.trunk_flops)
    assert one.trunk_flops == (25 + 5) * FRAMES * trunk_per_frame(224)[1]  # 5-way 5-shot, one query a class


def test_deterministic():
    assert task_compute("strm", DIM, queries=2, **SMALL) == task_compute("strm", DIM, queries=2, **SMALL)


def test_compute_table_rows():
    rows = compute_table(["trm", "jnt-st-1", "strm"], DIM, queries=(1, 4), **SMALL)
    assert [(r["variant"], r["queries"]) for r in rows] == [(v, q) for q in (1, 4) for v in ("trm", "jnt-st-1", "strm")]
    for row in rows:
        assert row["total_flops"] == row["heads_flops"] + row["trunk_flops"]
        base = next(r for r in rows if r["variant"] == "trm" and r["queries"] == row["queries"])
        assert row["heads_flops_vs_baseline"] == row["heads_flops"] / base["heads_flops"]
        assert row["total_flops_vs_baseline"] == row["total_flops"] / base["total_flops"]
        assert row["params_vs_baseline"] == row["params"] / base["params"]
    assert rows[0]["heads_flops_vs_baseline"] == 1.0 and rows[1]["heads_flops_vs_baseline"] > 1.0
    assert compute_table(["jnt-st-1"], DIM, queries=(1,), **SMALL)[0] == rows[1]  # the baseline row need not be asked


def test_training_step_flops_counts_backward():
    """The heads bench's count: forward plus backward is more than a forward and at most three of them
    (each product's backward is two products of its size, one when its input needs no gradient)."""
    torch.manual_seed(0)
    heads = build_heads("strm", DIM, **SMALL).train()
    support, labels, query, query_labels = random_task(heads, 5, 5, 4)
    forward = count_flops(lambda: heads(support, labels, query))
    step = training_step_flops(heads, support, labels, query, query_labels)
    assert forward < step <= 3 * forward
    assert step > 2 * forward  # weight gradients alone double every parameter product
    assert all(p.grad is None for p in heads.parameters())
