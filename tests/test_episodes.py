"""Episode sampling: pure functions of (seed, index), the authors' without-replacement draws."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.episodes import EpisodeSampler

LABELS = np.repeat(np.arange(7), [6, 9, 6, 12, 6, 3, 8])  # uneven classes; class 5 too small


def test_task_depends_only_on_seed_and_index():
    a = EpisodeSampler(LABELS, way=5, shot=3, queries=2, seed=4, views=3)
    b = EpisodeSampler(LABELS, way=5, shot=3, queries=2, seed=4, views=3)
    assert all((getattr(a.task(17), f) == getattr(b.task(17), f)).all() for f in ("support", "query", "support_views"))
    assert not np.array_equal(a.task(17).support, a.task(18).support)
    assert not np.array_equal(
        a.task(17).support, EpisodeSampler(LABELS, way=5, shot=3, queries=2, seed=5).task(17).support
    )


def test_task_structure_and_without_replacement():
    sampler = EpisodeSampler(LABELS, way=5, shot=3, queries=2, seed=0, views=4)
    for i in range(50):
        t = sampler.task(i)
        assert len(set(t.classes)) == 5 and 5 not in t.classes
        videos = np.concatenate([t.support, t.query])
        assert len(set(videos)) == len(videos)
        assert (LABELS[t.support] == t.classes[t.support_labels]).all()
        assert (LABELS[t.query] == t.classes[t.query_labels]).all()
        assert t.support_views.max() < 4 and t.query.shape == (10,)


def test_batch_stacks_the_same_tasks():
    sampler = EpisodeSampler(LABELS, way=3, shot=2, queries=1, seed=1)
    batch = sampler.batch(10, 4)
    assert len(batch) == 4 and batch.support.shape == (4, 6)
    np.testing.assert_array_equal(batch.query[2], sampler.task(12).query)


def test_impossible_task_is_a_clear_error():
    with pytest.raises(ValueError, match="needs 7 classes with >= 7 videos; this split has 3"):
        EpisodeSampler(LABELS, way=7, shot=5, queries=2, seed=0)
