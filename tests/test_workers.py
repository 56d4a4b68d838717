"""imap_isolated: every item answered once, and a worker that dies fails only the item it held."""

from __future__ import annotations

import ctypes
import os
import time

import pytest

from pipeline.runtime.workers import imap_isolated


def square_or_fail(x: int) -> int:
    """Crashes the process on 3 (a real segfault, as a decoder does), raises on 5, sleeps on 7."""
    if x == 3:
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    if x == 5:
        raise ValueError("five is bad")
    if x == 7:
        time.sleep(30)
    return x * x


def pid_of(_: int) -> int:
    return os.getpid()


def test_crash_fails_only_its_item_and_the_rest_go_on():
    results = {item: (value, error) for item, value, error in imap_isolated(square_or_fail, range(7), workers=2)}
    assert sorted(results) == list(range(7))
    for x in (0, 1, 2, 4, 6):
        assert results[x] == (x * x, None)
    value, error = results[3]
    assert value is None and "SIGSEGV" in error
    value, error = results[5]
    assert value is None and error == "ValueError: five is bad"


def test_timeout_stops_a_hung_item_only():
    start = time.monotonic()
    results = {
        item: (value, error) for item, value, error in imap_isolated(square_or_fail, [7, 2, 4], workers=1, timeout_s=2)
    }
    assert results[2] == (4, None) and results[4] == (16, None)
    assert results[7][0] is None and "timed out" in results[7][1]
    assert time.monotonic() - start < 25  # the 30 s sleep was cut short


def test_lazy_source_is_bounded_by_max_in_flight():
    taken = []

    def source():
        for x in range(6):
            taken.append(x)
            yield x

    stream = imap_isolated(pid_of, source(), workers=2, max_in_flight=2)
    next(stream)
    assert len(taken) <= 3  # two in flight, plus at most one taken after the first was yielded
    rest = list(stream)
    assert len(rest) == 5 and len(taken) == 6
    assert all(os.getpid() != pid for _, pid, _ in rest)  # ran in other processes


def test_rejects_no_workers():
    with pytest.raises(ValueError):
        list(imap_isolated(pid_of, [1], workers=0))
