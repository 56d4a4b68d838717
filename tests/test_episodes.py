"""Episode sampling: pure functions of (seed, index), the authors' without-replacement draws."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from pipeline.data.episodes import UNKNOWN, EpisodeSampler

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


CLOSED = ("classes", "support", "support_labels", "support_views", "query", "query_labels", "query_views")


def _fingerprint(sampler: EpisodeSampler, n: int = 200) -> str:
    h = hashlib.sha256()
    for i in range(n):
        t = sampler.task(i)
        for name in CLOSED:
            a = getattr(t, name)
            h.update(name.encode() + str(a.dtype).encode() + np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize(
    ("settings", "digest"),
    [
        (dict(way=5, shot=3, queries=2, seed=4, views=3), "58d9ea0b0861731a"),
        (dict(way=3, shot=2, queries=1, seed=0), "11726ba247615ba9"),
        (dict(way=5, shot=1, queries=1, seed=7, views=2), "a693467505b4eb26"),
    ],
)
def test_no_unknown_classes_gives_the_closed_set_tasks_bit_for_bit(settings, digest):
    """Digests of 200 tasks' arrays (values and dtypes) recorded with the sampler before open-set tasks existed."""
    assert _fingerprint(EpisodeSampler(LABELS, **settings)) == digest
    assert _fingerprint(EpisodeSampler(LABELS, **settings, unknown_classes=0, unknown_queries=3)) == digest
    t = EpisodeSampler(LABELS, **settings).task(3)
    assert t.unknown_query.shape == (0,) and t.unknown_classes.shape == (0,)
    batch = EpisodeSampler(LABELS, **settings).batch(0, 4)
    assert batch.unknown_query.shape == (4, 0) and batch.open_queries()[0].shape == batch.query.shape


def test_unknown_queries_are_deterministic_disjoint_and_leave_the_known_part_alone():
    plain = EpisodeSampler(LABELS, way=3, shot=2, queries=1, seed=5, views=2)
    open_set = EpisodeSampler(LABELS, way=3, shot=2, queries=1, seed=5, views=2, unknown_classes=3, unknown_queries=2)
    again = EpisodeSampler(LABELS, way=3, shot=2, queries=1, seed=5, views=2, unknown_classes=3, unknown_queries=2)
    drawn = set()
    for i in range(60):
        t, known = open_set.task(i), plain.task(i)
        for name in CLOSED:
            np.testing.assert_array_equal(getattr(t, name), getattr(known, name), err_msg=name)
        for name in ("unknown_classes", "unknown_query", "unknown_query_views"):
            np.testing.assert_array_equal(getattr(t, name), getattr(again.task(i), name), err_msg=name)
        assert len(set(t.unknown_classes)) == 3 and not set(t.unknown_classes) & set(t.classes)
        assert t.unknown_query.shape == (6,) and len(set(t.unknown_query)) == 6
        assert (LABELS[t.unknown_query] == np.repeat(t.unknown_classes, 2)).all()
        assert (t.unknown_query_labels == UNKNOWN).all() and t.unknown_query_views.max() < 2
        videos, labels, views = t.open_queries()
        assert videos.shape == labels.shape == views.shape == (9,) and (labels[3:] == UNKNOWN).all()
        drawn |= set(t.unknown_classes.tolist())
    assert drawn == set(range(7))  # every class serves as an unknown some time, class 5 (3 videos) included
    batch = open_set.batch(10, 5)
    assert batch.unknown_query.shape == (5, 6)
    np.testing.assert_array_equal(batch.unknown_query[2], open_set.task(12).unknown_query)


def test_too_many_unknown_classes_is_a_one_line_error():
    EpisodeSampler(LABELS, way=3, shot=2, queries=1, seed=0, unknown_classes=4, unknown_queries=2)  # 7 - 3: fits
    with pytest.raises(ValueError, match=r"^unknown_classes=5 is more than .* at most 4 ") as err:
        EpisodeSampler(LABELS, way=3, shot=2, queries=1, seed=0, unknown_classes=5, unknown_queries=2)
    assert "\n" not in str(err.value)
    # 4 videos a class or more: classes 0-4 and 6 (six); at worst 3 of them are the task's own
    with pytest.raises(ValueError, match=r"unknown_classes=4 .* at most 3 \(classes with >= 4 videos: 6\)"):
        EpisodeSampler(LABELS, way=3, shot=2, queries=1, seed=0, unknown_classes=4, unknown_queries=4)
    with pytest.raises(ValueError, match="unknown_queries >= 1"):
        EpisodeSampler(LABELS, way=3, shot=2, queries=1, seed=0, unknown_classes=2)


def test_a_split_too_small_for_the_task_is_told_the_largest_way_and_shot_it_allows():
    labels = np.repeat(np.arange(8), [12, 11, 9, 9, 6, 4, 3, 3])
    with pytest.raises(ValueError) as err:
        EpisodeSampler(labels, way=5, shot=5, queries=4, seed=0)
    assert str(err.value).endswith(
        "this split has 4 such classes out of 8; with 4 queries it allows at most 4-way at 5 shots or 2 shots at 5-way"
    )
    with pytest.raises(ValueError, match=r"out of 2 \(its largest class has 3 videos\)$"):
        EpisodeSampler(np.repeat(np.arange(2), 3), way=5, shot=5, queries=4, seed=0)
