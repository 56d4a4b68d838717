"""strm ablate: the grid, post-training changes, identical tasks, the table's rows, its FLOPs columns and its
resumability."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from pipeline.evaluation.compute import task_compute
from pipeline.features.cache import open_cache
from pipeline.features.copies import write_random_cache
from pipeline.heads import build_heads
from pipeline.studies.ablation import (
    TrainSettings,
    after_training,
    parse_grid,
    run_grid,
)
from stages.app import app

DIM = 32
TINY = {"trm_dim": 16, "psi_dim": 16, "qc_dim": 16}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("ablate") / "cache"
    write_random_cache(path, splits={"train": (6, 9, 2), "val": (5, 6, 1), "test": (6, 6, 1)}, dim=DIM, signal=0.6)
    return open_cache(path)


def test_parse_grid_is_the_product_labelled_by_what_varies():
    points = parse_grid(["trm,strm"], cardinalities=["1", "2+3"], lambdas=["0.1,0.5"])
    assert len(points) == 2 * 2 * 2
    labels = [p.label for p in points]
    assert "trm Ω={1} λ=0.1" in labels and "strm Ω={2,3} λ=0.5" in labels
    assert len({p.slug for p in points}) == len(points)
    strm = [p for p in points if p.variant == "strm" and p.cardinalities == (2, 3) and p.lambda_qc == 0.5][0]
    assert strm.heads_options() == {"cardinalities": [2, 3]}


def test_parse_grid_single_values_keep_plain_variant_names_and_post_training_rows():
    points = parse_grid(["proto", "trm", "strm", "strm:gamma0", "strm:no-qc"], retain=["0.5"])
    assert [p.label for p in points] == ["proto", "trm", "strm", "strm, gamma forced to 0", "strm, no QC"]
    assert points[3].trained.label == "strm" and points[3].trained.after is None
    assert points[2].heads_options() == {"tuple_keep": 0.5}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (dict(variants=["nope"]), "unknown variant"),
        (dict(variants=["trm:gamma0"]), "no PLE or joint attention gate"),
        (dict(variants=["fle-trm:gamma0"]), "no PLE or joint attention gate"),
        (dict(variants=["trm:no-qc"]), "no QC"),
        (dict(variants=["strm:later"]), "unknown post-training change"),
        (dict(variants=["strm,strm"]), "same row twice"),
        (dict(variants=["strm"], retain=["1.5"]), "fraction"),
        (dict(variants=["strm"], cardinalities=["two"]), "not a set"),
    ],
)
def test_parse_grid_errors_name_the_problem(args, message):
    with pytest.raises(ValueError, match=message):
        parse_grid(**args)


def test_after_training_changes():
    torch.manual_seed(0)
    heads = build_heads("strm", dim=DIM, **TINY).eval()
    with torch.no_grad():
        heads.ple.gamma.fill_(0.7)
    support, query = torch.randn(10, 8, 16, DIM), torch.randn(4, 8, 16, DIM)
    labels = torch.arange(5).repeat_interleave(2)
    before = heads(support, labels, query)
    after_training(heads, "gamma0")
    assert float(heads.ple.gamma.detach()) == 0.0
    assert not torch.allclose(heads(support, labels, query).trm_logits, before.trm_logits)
    after_training(heads, "no-qc")
    out = heads(support, labels, query)
    assert out.qc_logits is None and torch.equal(out.logits, out.trm_logits)


def test_parse_grid_allows_gamma0_on_the_joint_variants():
    points = parse_grid(["jnt-st-1,jnt-st-1:gamma0,jnt-st-2:gamma0"])
    assert [p.label for p in points] == ["jnt-st-1", "jnt-st-1, gamma forced to 0", "jnt-st-2, gamma forced to 0"]
    assert points[2].trained.label == "jnt-st-2" and points[2].after == "gamma0"


def test_after_training_gamma0_zeroes_every_joint_layer():
    torch.manual_seed(0)
    heads = build_heads("jnt-st-2", dim=DIM, **TINY).eval()
    with torch.no_grad():
        for layer in heads.joint.layers:
            layer.gamma.fill_(0.7)
    support, query = torch.randn(10, 8, 16, DIM), torch.randn(4, 8, 16, DIM)
    labels = torch.arange(5).repeat_interleave(2)
    before = heads(support, labels, query).logits
    after_training(heads, "gamma0")
    assert [float(layer.gamma.detach()) for layer in heads.joint.layers] == [0.0, 0.0]
    assert not torch.allclose(heads(support, labels, query).logits, before)
    # With every gate at 0 each layer is psi alone: the same as heads whose attention branch never existed.
    plain = build_heads("jnt-st-2", dim=DIM, gamma_zero=True, **TINY).eval()
    plain.load_state_dict({k: v for k, v in heads.state_dict().items() if ".qkv." not in k and not k.endswith("gamma")})
    torch.testing.assert_close(heads(support, labels, query).logits, plain(support, labels, query).logits)


def test_after_training_gamma0_refuses_heads_without_a_gate():
    with pytest.raises(ValueError, match="no attention gate"):
        after_training(build_heads("trm", dim=DIM, **TINY), "gamma0")


def test_run_grid_trains_once_per_point_evaluates_identical_tasks_and_resumes(cache, tmp_path):
    points = parse_grid(["proto", "trm", "strm", "strm:gamma0", "strm:no-qc"])
    settings = TrainSettings(episodes=4, seed=0, val_every=2, val_episodes=5, heads_options=TINY)
    outcome = run_grid(points, cache, tmp_path, settings, episodes=40, reference="trm")
    # Trained points only: post-training rows reuse strm's run, proto trains nothing.
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["strm", "trm"]
    table = pd.read_csv(tmp_path / "ablation.csv")
    assert list(table["row"]) == [p.label for p in points]
    digests = {r.settings["episodes_digest"] for r in outcome.results.values()}
    assert len(digests) == 1  # every row saw the same tasks
    ref = table.set_index("row").loc["trm"]
    assert ref["difference"] == 0 and ref["difference_ci95"] == 0
    for label, result in outcome.results.items():
        assert table.set_index("row").loc[label, "accuracy"] == pytest.approx(result.mean)
    no_qc = table.set_index("row").loc["strm, no QC"]
    assert no_qc["after_training"] == "no QC" and no_qc["variant"] == "strm"
    markdown = (tmp_path / "ablation.md").read_text()
    for label in outcome.results:
        assert f"| {label} |" in markdown
    assert (tmp_path / "ablation.png").stat().st_size > 10_000

    # A second run finds everything done: no training, no evaluation redone.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "eval").iterdir()}
    last = (tmp_path / "train" / "strm" / "last.pt").stat().st_mtime_ns
    again = run_grid(points, cache, tmp_path, settings, episodes=40, reference="trm")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "eval").iterdir()} == stamps
    assert (tmp_path / "train" / "strm" / "last.pt").stat().st_mtime_ns == last
    assert {k: r.mean for k, r in again.results.items()} == {k: r.mean for k, r in outcome.results.items()}


def test_cli_writes_a_table_whose_rows_match_the_grid(cache, tmp_path):
    out = tmp_path / "grid"
    result = CliRunner().invoke(
        app,
        [
            "ablate",
            "--cache",
            str(cache.path),
            "--variants",
            "trm",
            "--cardinalities",
            "1,2",
            "--train-episodes",
            "3",
            "--val-every",
            "0",
            "--episodes",
            "30",
            "--trm-dim",
            "16",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "ablation.csv")
    assert list(table["row"]) == ["trm Ω={1}", "trm Ω={2}"]
    assert list(table["cardinalities"]) == ["{1}", "{2}"]
    record = json.loads((out / "eval" / "trm_card_1.json").read_text())
    assert record["results"][0]["episodes"] == 30
    assert "heads_gflop" not in table.columns  # only with --flops


def test_cli_flops_columns(cache, tmp_path):
    out = tmp_path / "flops"
    result = CliRunner().invoke(
        app,
        [
            "ablate",
            "--cache",
            str(cache.path),
            "--variants",
            "proto,trm,strm,strm:no-qc,jnt-st-1:gamma0",
            "--reference",
            "trm",
            "--train-episodes",
            "2",
            "--val-every",
            "0",
            "--episodes",
            "20",
            "--trm-dim",
            "16",
            "--flops",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "ablation.csv").set_index("row")
    assert {"heads_gflop", "heads_flops_vs_reference"} <= set(table.columns)
    assert math.isnan(table.loc["proto", "heads_gflop"]) and math.isnan(table.loc["proto", "heads_flops_vs_reference"])
    assert table.loc["trm", "heads_flops_vs_reference"] == 1.0

    def gflop(variant: str, **options) -> float:
        return (
            task_compute(
                variant,
                cache.dim,
                way=5,
                shot=5,
                queries=1,
                frames=cache.frames,
                patches=cache.patches,
                trm_dim=16,
                **options,
            ).heads_flops
            / 1e9
        )

    assert table.loc["strm", "heads_gflop"] == pytest.approx(gflop("strm"))
    assert table.loc["strm", "heads_flops_vs_reference"] == pytest.approx(gflop("strm") / gflop("trm"))
    assert table.loc["strm, no QC", "heads_gflop"] == pytest.approx(gflop("strm", qc=False))
    assert table.loc["strm, no QC", "heads_gflop"] < table.loc["strm", "heads_gflop"]
    # A zeroed gate still computes its attention branch: the trained point's cost.
    assert table.loc["jnt-st-1, gamma forced to 0", "heads_gflop"] == pytest.approx(gflop("jnt-st-1"))
    proto_line = next(line for line in (out / "ablation.md").read_text().splitlines() if line.startswith("| proto |"))
    assert proto_line.rstrip().endswith("|  |  |")  # the two FLOPs cells, blank


def test_cli_errors_are_one_line(cache, tmp_path):
    result = CliRunner().invoke(
        app, ["ablate", "--cache", str(cache.path), "--variants", "strm,bogus", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "unknown variant 'bogus'" in result.output
