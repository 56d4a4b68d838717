"""Evaluation: the batched path equals the per-task forward, tasks follow the seed, the numbers add up."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from pipeline import evaluation as ev
from pipeline.data.episodes import EpisodeSampler, Task, TaskBatch
from pipeline.evaluation import batched
from pipeline.features.copies import write_random_cache
from pipeline.features.readers import SplitFeatures
from pipeline.heads import build_heads, save_heads
from stages.app import app

DIM, TRM_DIM = 32, 24
GOLDEN = "strm_official_golden.pt"
COUNTS = [7, 9, 6, 12, 6, 3, 8, 10]  # uneven classes; one (3 videos) too small for most settings


def _split(counts=COUNTS, dim=DIM, signal=0.0, seed=0) -> SplitFeatures:
    """Random features [N, 1, 8, 16, D] float16; each class has a pattern scaled by `signal`."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.from_numpy(np.repeat(np.arange(len(counts)), counts))
    patterns = torch.randn(len(counts), 1, 8, 16, dim, generator=g)
    features = (signal * patterns[labels] + torch.randn(len(labels), 1, 8, 16, dim, generator=g)).half()
    return SplitFeatures(
        features=features,
        labels=labels,
        class_names=[f"class{c}" for c in range(len(counts))],
        video_ids=[f"class{c}/v{i}" for i, c in enumerate(labels.tolist())],
    )


@pytest.fixture(scope="module")
def split() -> SplitFeatures:
    return _split()


@pytest.fixture(scope="module")
def heads() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_heads("strm", dim=DIM, trm_dim=TRM_DIM).eval()


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-6)).max())


@pytest.mark.parametrize(("way", "shot", "queries"), [(5, 1, 1), (5, 3, 2), (3, 5, 1), (4, 2, 3)])
def test_batched_logits_equal_the_per_task_forward(split, heads, way, shot, queries):
    tasks = ev.sample_tasks(split.labels, episodes=12, way=way, shot=shot, queries=queries, seed=3)
    embedding = ev.embed_split(heads, split.features[:, 0], batch_size=16)  # several encode chunks
    fast = ev.relate_tasks(heads, embedding, tasks)
    sampler = EpisodeSampler(split.labels.numpy(), way=way, shot=shot, queries=queries, seed=3)
    assert fast.logits.shape == (12, way * queries, way)
    for b in range(12):
        naive = ev.naive_logits(heads, split.features[:, 0], sampler.task(b))
        for name in ("logits", "trm_logits", "qc_logits"):
            assert _relative_error(getattr(fast, name)[b], getattr(naive, name)) < 1e-4, (name, b)


def test_trx_variant_and_shuffled_support_order_are_exact(split):
    """Another variant (two cardinalities, no QC), with support labels not grouped by class."""
    torch.manual_seed(1)
    trx = build_heads("trx", dim=DIM, trm_dim=TRM_DIM).eval()
    tasks = ev.sample_tasks(split.labels, episodes=6, way=5, shot=2, queries=1, seed=9)
    perm = np.random.default_rng(0).permutation(tasks.support.shape[1])
    tasks = TaskBatch(
        **{**tasks.__dict__, "support": tasks.support[:, perm], "support_labels": tasks.support_labels[:, perm]}
    )
    fast = ev.relate_tasks(trx, ev.embed_split(trx, split.features[:, 0]), tasks)
    for b in range(6):
        task = ev.slice_tasks(tasks, slice(b, b + 1))
        single = Task(**{name: getattr(task, name)[0] for name in Task.__dataclass_fields__})
        assert _relative_error(fast.logits[b], ev.naive_logits(trx, split.features[:, 0], single).logits) < 1e-4


def test_qc_table_holds_each_tuples_nearest_distance(split, heads):
    """Blocks of the table (and both directions of each) against distances written out."""
    embedding = ev.embed_split(heads, split.features[:, 0])
    (table,) = ev.qc_nearest_tables(embedding)
    z = embedding.qc[0].double()
    brute = torch.cdist(z[:, None], z[None]).square()  # [N, N, T, T]: tuple t of q, tuple j of s
    n = len(z)
    assert n > ev.QC_TABLE_BLOCK and table.shape == (n, n, z.shape[1])
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    torch.testing.assert_close(table.double()[off_diagonal], brute.amin(-1)[off_diagonal], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(("way", "shot", "queries"), [(5, 1, 1), (3, 5, 2)])
def test_relate_with_the_qc_table_equals_relate_with_the_tuples(split, heads, way, shot, queries):
    tasks = ev.sample_tasks(split.labels, episodes=10, way=way, shot=shot, queries=queries, seed=4)
    perm = np.random.default_rng(1).permutation(tasks.support.shape[1])  # support not grouped by class
    tasks = TaskBatch(
        **{**tasks.__dict__, "support": tasks.support[:, perm], "support_labels": tasks.support_labels[:, perm]}
    )
    embedding = ev.embed_split(heads, split.features[:, 0])
    tables = ev.qc_nearest_tables(embedding)
    plain = ev.relate_tasks(heads, embedding, tasks)
    without_tuples = dataclasses.replace(embedding, qc=(), qc_norms=())
    tabled = ev.relate_tasks(heads, without_tuples, tasks, qc_tables=tables)
    assert _relative_error(tabled.qc_logits, plain.qc_logits) < 1e-5
    assert _relative_error(tabled.logits, plain.logits) < 1e-5
    support, query = torch.as_tensor(tasks.support[0]), torch.as_tensor(tasks.query[0])  # one task, unbatched
    nearest = [t[query[:, None], support[None]] for t in tables]
    with torch.no_grad():
        one = heads.relate(
            without_tuples[support],
            torch.as_tensor(tasks.support_labels[0]),
            without_tuples[query],
            way,
            qc_nearest=nearest,
        )
    assert _relative_error(one.logits, plain.logits[0]) < 1e-5
    trm_only = build_heads("trm", dim=DIM, trm_dim=TRM_DIM).eval()
    with pytest.raises(ValueError, match="have no QC"):
        trm_only.relate(
            without_tuples[support],
            torch.as_tensor(tasks.support_labels[0]),
            without_tuples[query],
            way,
            qc_nearest=nearest,
        )


def test_qc_table_is_used_when_it_makes_no_more_products_than_the_tasks(split, heads, monkeypatch):
    embedding = ev.embed_split(heads, split.features[:, 0])
    n = len(split.labels)
    dense = ev.sample_tasks(split.labels, episodes=40, way=5, shot=2, queries=2, seed=5)  # 4,000 pairs
    sparse = ev.sample_tasks(split.labels, episodes=3, way=5, shot=2, queries=1, seed=5)  # 150 pairs
    assert 40 * 10 * 10 >= n * n / 2 > 3 * 5 * 10
    assert ev.qc_tables_pay(embedding, dense) and not ev.qc_tables_pay(embedding, sparse)
    assert not ev.qc_tables_pay(ev.embed_split(ev.ProtoBaseline(), split.features[:, 0]), dense)
    assert not ev.qc_tables_pay(dataclasses.replace(embedding, qc=(), qc_norms=()), dense)
    monkeypatch.setattr(batched, "QC_TABLE_MAX_BYTES", n * n * 28 * 4 - 1)
    assert not ev.qc_tables_pay(embedding, dense)


def test_evaluate_counts_agree_with_the_logits(split, heads):
    result = ev.evaluate(heads, split, episodes=40, way=5, shot=2, queries=2, seed=5, batch_tasks=7, split_name="test")
    tasks = ev.sample_tasks(split.labels, episodes=40, way=5, shot=2, queries=2, seed=5)
    logits = ev.relate_tasks(heads, ev.embed_split(heads, split.features[:, 0]), tasks).logits
    correct = logits.argmax(-1).numpy() == tasks.query_labels
    np.testing.assert_allclose(result.task_accuracy, 100 * correct.mean(1))
    assert result.mean == pytest.approx(100 * correct.mean())
    assert result.confusion.sum() == 40 * 10 and result.confusion.shape == (8, 8)
    assert result.confusion[5].sum() == 0 and "class5" not in result.per_class  # too small to be drawn
    for c, name in enumerate(split.class_names):
        if name in result.per_class:
            assert result.per_class[name] == pytest.approx(100 * result.confusion[c, c] / result.confusion[c].sum())
    assert result.settings["way"] == 5 and result.settings["shot"] == 2 and result.seed == 5


def test_interval_is_196_population_std_over_sqrt_n():
    values = [0.0, 100.0, 100.0, 50.0]
    mean = sum(values) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 4)
    assert ev.interval95(values) == pytest.approx(1.96 * std / 2)
    result = ev.EvalResult(np.array(values), {}, np.zeros((1, 1), dtype=np.int64), ["a"], {"seed": 0})
    assert result.ci95 == pytest.approx(1.96 * std / 2) and result.mean == pytest.approx(mean)


def test_same_seed_same_tasks_other_seed_other_tasks(split):
    a = ev.sample_tasks(split.labels, episodes=30, way=5, shot=2, queries=1, seed=7)
    b = ev.sample_tasks(split.labels, episodes=30, way=5, shot=2, queries=1, seed=7)
    c = ev.sample_tasks(split.labels, episodes=30, way=5, shot=2, queries=1, seed=8)
    np.testing.assert_array_equal(a.support, b.support)
    np.testing.assert_array_equal(a.query, b.query)
    assert ev.episodes_digest(a, split.video_ids) == ev.episodes_digest(b, split.video_ids)
    assert ev.episodes_digest(a, split.video_ids) != ev.episodes_digest(c, split.video_ids)
    # The evaluation of two different models sees identical tasks.
    torch.manual_seed(3)
    other = build_heads("trm", dim=DIM, trm_dim=TRM_DIM)
    r1 = ev.evaluate(other, split, episodes=30, way=5, shot=2, seed=7)
    r2 = ev.evaluate(ev.ProtoBaseline(), split, episodes=30, way=5, shot=2, seed=7)
    assert r1.settings["episodes_digest"] == r2.settings["episodes_digest"]


def test_saved_episodes_round_trip(tmp_path, split, heads):
    tasks = ev.sample_tasks(split.labels, episodes=15, way=4, shot=3, queries=2, seed=11)
    path = ev.save_episodes(tmp_path / "episodes.json", tasks, split, seed=11, split_name="test")
    saved = json.loads(path.read_text())
    assert saved["tasks"][0]["support"][0][0] == split.video_ids[tasks.support[0, 0]]
    loaded, settings = ev.load_episodes(path, split)
    for name in TaskBatch.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(loaded, name), getattr(tasks, name), err_msg=name)
    assert settings == {"split": "test", "seed": 11, "way": 4, "shot": 3, "queries": 2, "episodes": 15}
    again = ev.evaluate(heads, split, tasks=loaded, seed=11)
    direct = ev.evaluate(heads, split, episodes=15, way=4, shot=3, queries=2, seed=11)
    np.testing.assert_array_equal(again.task_accuracy, direct.task_accuracy)
    assert again.settings["episodes_digest"] == direct.settings["episodes_digest"]


def test_loading_episodes_names_an_unknown_video(tmp_path, split):
    tasks = ev.sample_tasks(split.labels, episodes=2, way=3, shot=1, queries=1, seed=0)
    path = ev.save_episodes(tmp_path / "e.json", tasks, split, seed=0, split_name="test")
    path.write_text(path.read_text().replace(split.video_ids[tasks.query[1, 0]], "nowhere/v9"))
    with pytest.raises(ValueError, match=r"e\.json: video 'nowhere/v9' is not in this split"):
        ev.load_episodes(path, split)


def test_proto_baseline_separates_structured_classes_and_not_noise():
    structured, noise = _split(signal=1.0, seed=1), _split(signal=0.0, seed=1)
    good = ev.evaluate(ev.ProtoBaseline(), structured, episodes=100, way=5, shot=2, seed=0)
    chance = ev.evaluate(ev.ProtoBaseline(), noise, episodes=300, way=5, shot=2, seed=0)
    assert good.mean > 90
    assert abs(chance.mean - 20) < 3 * chance.ci95 + 2  # chance is 1/way


def test_proto_batched_equals_per_task(split):
    proto = ev.ProtoBaseline()
    tasks = ev.sample_tasks(split.labels, episodes=5, way=5, shot=3, queries=2, seed=2)
    fast = ev.relate_tasks(proto, ev.embed_split(proto, split.features[:, 0]), tasks).logits
    sampler = EpisodeSampler(split.labels.numpy(), way=5, shot=3, queries=2, seed=2)
    for b in range(5):
        assert _relative_error(fast[b], ev.naive_logits(proto, split.features[:, 0], sampler.task(b)).logits) < 1e-4


def test_paired_difference_and_refusal(split, heads):
    a = ev.evaluate(heads, split, episodes=50, way=5, shot=2, seed=4, split_name="test")
    b = ev.evaluate(ev.ProtoBaseline(), split, episodes=50, way=5, shot=2, seed=4, split_name="test")
    (pair,) = ev.compare_runs({"results": [a.to_dict()]}, {"results": [b.to_dict()]})
    diff = a.task_accuracy - b.task_accuracy
    assert pair.difference == pytest.approx(diff.mean())
    assert pair.ci95 == pytest.approx(1.96 * diff.std() / math.sqrt(50))
    assert pair.a_better + pair.b_better + pair.ties == 50
    other = ev.evaluate(ev.ProtoBaseline(), split, episodes=50, way=5, shot=2, seed=5, split_name="test")
    with pytest.raises(ValueError, match="seed is 4 in A and 5 in B"):
        ev.compare_runs({"results": [a.to_dict()]}, {"results": [other.to_dict()]})
    shot3 = ev.evaluate(ev.ProtoBaseline(), split, episodes=50, way=5, shot=3, seed=4, split_name="test")
    with pytest.raises(ValueError, match="share no setting"):
        ev.compare_runs({"results": [a.to_dict()]}, {"results": [shot3.to_dict()]})


def test_cli_evaluate_sweep_files_and_compare(tmp_path):
    cache = write_random_cache(tmp_path / "cache", splits={"test": (6, 7, 1)}, dim=DIM, seed=0)
    torch.manual_seed(0)
    save_heads(tmp_path / "heads.pt", build_heads("strm", dim=DIM, trm_dim=TRM_DIM))
    runner = CliRunner()
    common = ["evaluate", "--cache", str(cache), "--episodes", "40", "--shot", "1,3", "--device", "cpu"]
    out = runner.invoke(
        app,
        common
        + [
            "--checkpoint",
            str(tmp_path / "heads.pt"),
            "--json",
            str(tmp_path / "a.json"),
            "--save-episodes",
            str(tmp_path / "ep.json"),
        ],
    )
    assert out.exit_code == 0, out.output
    assert "5-way 3-shot" in out.output and "seed 0" in out.output and "±" in out.output
    assert "heads: 5-way 1-shot" in out.output  # results named after the checkpoint
    record = ev.read_run(tmp_path / "a.json")
    assert [r["shot"] for r in record["results"]] == [1, 3] and len(record["results"][0]["task_accuracy"]) == 40
    for name in ("a.png", "ep_shot1.json", "ep_shot3.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    table = pd.read_csv(tmp_path / "a.csv")
    overall = table[table.scope == "all"].set_index("shot")
    assert overall.loc[3, "accuracy"] == pytest.approx(record["results"][1]["mean"])
    assert set(table.scope) - {"all"} == set(record["results"][0]["per_class"])

    out = runner.invoke(
        app,
        [
            "evaluate",
            "--cache",
            str(cache),
            "--baseline",
            "proto",
            "--device",
            "cpu",
            "--episodes-file",
            str(tmp_path / "ep_shot3.json"),
            "--json",
            str(tmp_path / "b.json"),
        ],
    )
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert out.exit_code == 0, out.output
    assert "5-way 3-shot, 40 tasks, seed 0" in out.output and "A - B" in out.output
    assert f"A = heads ({tmp_path / 'a.json'}), B = proto ({tmp_path / 'b.json'})" in out.output
    assert "A heads " in out.output and "B proto " in out.output  # each mean named after its model
    itself = runner.invoke(app, ["compare", str(tmp_path / "a.json"), str(tmp_path / "." / "a.json")])
    assert itself.exit_code == 2 and "compared with itself" in itself.output

    out = runner.invoke(app, common[:7] + ["--baseline", "proto", "--seed", "1", "--json", str(tmp_path / "c.json")])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["compare", str(tmp_path / "a.json"), str(tmp_path / "c.json")])
    assert out.exit_code == 1 and "seed is 0 in A and 1 in B" in out.output


def test_cli_errors_are_one_line(tmp_path):
    runner = CliRunner()
    out = runner.invoke(app, ["evaluate", "--cache", str(tmp_path), "--checkpoint", str(tmp_path / "missing.pt")])
    assert out.exit_code == 2 and "missing.pt: no such file" in out.output
    out = runner.invoke(app, ["evaluate", "--cache", str(tmp_path)])
    assert out.exit_code == 2 and "--checkpoint PATH, or --baseline" in out.output


def test_a_split_too_small_for_the_defaults_names_the_way_and_shot_it_allows(tmp_path):
    """4 test classes of 3 videos: the default 5-way 5-shot fails with the options that fit, one line."""
    cache = write_random_cache(tmp_path / "cache", splits={"test": (4, 3, 1)}, dim=DIM)
    args = ["evaluate", "--cache", str(cache), "--baseline", "proto", "--json", str(tmp_path / "r.json")]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 2
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: split 'test': a 5-way 5-shot task"), out.output
    assert lines[0].endswith("; pass --way 4 --shot 2")
    out = CliRunner().invoke(app, [*args, "--shot", "1,5", "--way", "4"])  # a sweep: the shot that does not fit
    assert out.exit_code == 2 and "a 4-way 5-shot task" in out.output
    assert out.output.strip().endswith("; pass --shot 2"), out.output
    assert CliRunner().invoke(app, [*args, "--way", "4", "--shot", "2", "--episodes", "3"]).exit_code == 0


def _golden() -> dict:
    for path in (Path(__file__).parent / "fixtures" / GOLDEN, Path("/work/shared/fixtures") / GOLDEN):
        if path.exists():
            return torch.load(path, weights_only=True)
    pytest.skip(f"{GOLDEN} not found")


def test_cli_detects_authors_checkpoints(tmp_path):
    """Authors' STRM (released: no QC weights) and TRX files go through the importer, variant detected."""
    golden = _golden()
    dim = golden["config"]["D"]
    cache = write_random_cache(tmp_path / "cache", splits={"test": (5, 3, 1)}, dim=dim, seed=1)
    strm = {k: v for k, v in golden["strm_state_dict"].items() if not k.startswith("new_dist_loss_post_pat")}
    torch.save({"iteration": 1, "model_state_dict": strm}, tmp_path / "strm_authors.pt")
    torch.save(golden["trx_state_dict"], tmp_path / "trx_authors.pt")
    runner = CliRunner()
    for name, variant in (("strm_authors", "strm"), ("trx_authors", "trx")):
        out = runner.invoke(
            app,
            [
                "evaluate",
                "--cache",
                str(cache),
                "--checkpoint",
                str(tmp_path / f"{name}.pt"),
                "--episodes",
                "8",
                "--shot",
                "2",
                "--device",
                "cpu",
                "--json",
                str(tmp_path / f"{name}.json"),
            ],
        )
        assert out.exit_code == 0, out.output
        record = ev.read_run(tmp_path / f"{name}.json")
        assert record["checkpoint_kind"] == "authors" and record["variant"] == variant
    assert "TRM logits alone" in ev.read_run(tmp_path / "strm_authors.json")["note"]
    out = runner.invoke(
        app,
        [
            "evaluate",
            "--cache",
            str(write_random_cache(tmp_path / "c32", splits={"test": (5, 3, 1)}, dim=32)),
            "--checkpoint",
            str(tmp_path / "trx_authors.pt"),
            "--episodes",
            "4",
        ],
    )
    assert out.exit_code == 1 and f"D={dim}" in out.output


def test_a_trx_authors_file_is_trx_in_every_stage(tmp_path):
    """The one loader decides the variant: evaluate, finetune's start, import-checkpoint and visualize agree."""
    from pipeline.training.checkpoints import load_checkpoint
    from pipeline.training.finetune import start_settings

    golden = _golden()
    torch.save(golden["trx_state_dict"], tmp_path / "trx.pt")
    loaded = load_checkpoint(tmp_path / "trx.pt")
    assert (loaded.kind, loaded.variant, loaded.heads.cardinalities) == ("authors", "trx", (2, 3))
    assert start_settings(loaded)["backbone"] == "resnet50" and start_settings(loaded)["normalize"] is False
    runner = CliRunner()
    out = runner.invoke(app, ["import-checkpoint", str(tmp_path / "trx.pt"), str(tmp_path / "trx_project.pt")])
    assert out.exit_code == 0, out.output
    assert torch.load(tmp_path / "trx_project.pt", weights_only=True)["variant"] == "trx"
    assert load_checkpoint(tmp_path / "trx_project.pt").variant == "trx"
    cache = write_random_cache(tmp_path / "cache", splits={"test": (5, 3, 1)}, dim=golden["config"]["D"], seed=1)
    out = runner.invoke(
        app,
        [
            "visualize",
            "--cache",
            str(cache),
            "--checkpoint",
            str(tmp_path / "trx.pt"),
            "--shot",
            "2",
            "--count",
            "1",
            "--out",
            str(tmp_path / "figures"),
        ],
    )
    assert out.exit_code == 0, out.output


def test_autocast_runs_and_mostly_agrees():
    """Mixed precision (bfloat16 on CPU here, float16 on CUDA) is an option; on separable classes it changes little."""
    structured = _split(signal=1.0, seed=2)
    torch.manual_seed(0)
    model = build_heads("strm", dim=DIM, trm_dim=TRM_DIM)
    exact = ev.evaluate(model, structured, episodes=30, way=5, shot=2, seed=0)
    mixed = ev.evaluate(model, structured, episodes=30, way=5, shot=2, seed=0, autocast=True)
    assert mixed.settings["autocast"] and not exact.settings["autocast"]
    assert abs(mixed.mean - exact.mean) <= 10


def test_the_untrained_baseline_is_where_train_heads_starts(tmp_path):
    """--baseline untrained --seed S scores the very heads a train-heads run with seed S starts from,
    feature standardisation included: with lr 0 one task of training changes nothing."""
    from pipeline.features.cache import open_cache
    from pipeline.heads import load_heads
    from pipeline.studies.eval_run import choose_model
    from pipeline.training.train import make_config, train

    cache = open_cache(write_random_cache(tmp_path / "c", splits={"train": (5, 4, 2), "test": (5, 3, 1)}, dim=8))
    run = train(
        make_config("frozen", episodes=1, lr=0.0, val_every=0, seed=3, way=2, shot=1, queries=1, device="cpu"),
        cache,
        tmp_path / "run",
    )
    started, _ = load_heads(run.best_checkpoint)
    baseline = choose_model(cache, baseline="untrained", seed=3).model
    assert baseline.feature_mean is not None and baseline.feature_mean.abs().sum() > 0
    for (name, a), (_, b) in zip(started.state_dict().items(), baseline.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    other = choose_model(cache, baseline="untrained", seed=4).model
    assert not torch.equal(other.ple.psi[0].weight, baseline.ple.psi[0].weight)


def test_two_runs_evaluated_keep_two_records_and_another_models_record_is_never_replaced(tmp_path, monkeypatch):
    """runs/a/best.pt and runs/b/best.pt used to write one runs/evaluate/best_test_5way_seed0.json:
    records are named after the run, and a record of another model is replaced only when asked."""
    monkeypatch.chdir(tmp_path)
    cache = write_random_cache(tmp_path / "cache", splits={"test": (6, 7, 1)}, dim=DIM)
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        save_heads(tmp_path / "runs" / name / "best.pt", build_heads("strm", dim=DIM, trm_dim=TRM_DIM))
    runner = CliRunner()
    common = ["evaluate", "--cache", str(cache), "--episodes", "20", "--device", "cpu"]
    outputs = [runner.invoke(app, [*common, "--checkpoint", f"runs/{n}/best.pt"]) for n in ("a", "b")]
    assert all(o.exit_code == 0 for o in outputs), [o.output for o in outputs]
    records = sorted(p.name for p in (tmp_path / "runs" / "evaluate").glob("*.json"))
    assert records == ["a-best_test_5way_seed0.json", "b-best_test_5way_seed0.json"]
    assert "a-best: 5-way 5-shot" in outputs[0].output and "b-best: 5-way 5-shot" in outputs[1].output

    target = "runs/evaluate/a-best_test_5way_seed0.json"
    before = Path(target).read_bytes()
    refused = runner.invoke(app, [*common, "--checkpoint", "runs/b/best.pt", "--json", target])
    assert refused.exit_code == 1 and "holds the results of another model" in refused.output
    assert "--overwrite" in refused.output and Path(target).read_bytes() == before
    again = runner.invoke(app, [*common, "--checkpoint", "runs/a/best.pt"])  # the same model: a rerun replaces
    assert again.exit_code == 0, again.output
    sweep = runner.invoke(
        app, [*common, "--checkpoint", "runs/b/best.pt", "--json", target, "--overwrite", "--shot", "1,2"]
    )
    assert sweep.exit_code == 0 and Path(target).with_suffix(".png").exists()
    single = runner.invoke(app, [*common, "--checkpoint", "runs/b/best.pt", "--json", target])
    assert single.exit_code == 0 and not Path(target).with_suffix(".png").exists()  # no stale sweep beside it


def test_non_finite_logits_are_refused_with_their_cause(split):
    heads = build_heads("strm", dim=DIM, trm_dim=TRM_DIM)
    with torch.no_grad():
        next(heads.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="not finite.*heads' weights or the split's features"):
        ev.evaluate(heads, split, episodes=4, way=5, shot=2, queries=1)


def test_evaluate_prints_classes_confusions_and_says_when_every_task_holds_the_same_classes(tmp_path):
    cache = write_random_cache(tmp_path / "cache", splits={"test": (4, 6, 1)}, dim=DIM, signal=0.05)  # 4 classes
    torch.manual_seed(0)
    save_heads(tmp_path / "heads.pt", build_heads("strm", dim=DIM, trm_dim=TRM_DIM))
    args = ["evaluate", "--cache", str(cache), "--checkpoint", str(tmp_path / "heads.pt"), "--episodes", "30"]
    out = CliRunner().invoke(
        app, [*args, "--way", "4", "--shot", "2", "--device", "cpu", "--json", str(tmp_path / "r.json")]
    )
    assert out.exit_code == 0, out.output
    record = json.loads((tmp_path / "r.json").read_text())["results"][0]
    worst = min(record["per_class"], key=record["per_class"].get)
    lines = out.output.splitlines()
    first = lines.index("per class (% of its queries right, worst first):")
    assert lines[first + 1].split()[-1] == worst and len(lines[first + 1 : first + 5]) == 4
    assert any(line.startswith("most confused (true -> predicted") for line in lines)
    assert "the split has 4 classes and tasks are 4-way, so every task holds the same classes" in out.output
    csv = (tmp_path / "r.csv").read_text().splitlines()
    assert all(len(cell.split(".")[-1]) <= 2 for row in csv[1:] for cell in row.split(",")[-2:] if "." in cell)
