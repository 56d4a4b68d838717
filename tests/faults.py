"""Faults tried at random: a stage is killed with SIGKILL at a seeded random moment and resumed to its
end, trial after trial (each with a fresh output), and each result is compared with an uninterrupted
run's.

One helper for every stage's test (extraction, train-heads, finetune). A moment is drawn uniformly
between `earliest_s` and the uninterrupted run's own duration, so kills land in start-up, in the
middle of the work and near its end; a run that ends before its kill is counted, not hidden. The
seed makes a failing campaign replayable: `make faults KILLS=20 SEED=N` runs the same moments.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Campaign:
    """What a campaign did: the moments drawn, how many kills landed, how the last run ended."""

    seed: int
    moments_s: list[float] = field(default_factory=list)
    landed: int = 0  # kills that found the run still going
    finished_early: int = 0  # runs that ended before their kill (not counted as kill points)
    matched: int = 0  # resumed results equal to the uninterrupted run's
    final_returncode: int | None = None
    final_stderr: str = ""

    def summary(self) -> str:
        return (
            f"seed {self.seed}: {len(self.moments_s)} trials, {self.landed} kills landed mid-run, "
            f"{self.finished_early} runs ended before their kill, {self.matched} resumed results matched"
        )


def timed_run(cmd: Sequence[str], *, env: dict[str, str], cwd: Path, timeout_s: float = 600) -> float:
    """Seconds an uninterrupted run takes (it must succeed): the scale of the kill moments."""
    start = time.monotonic()
    done = subprocess.run(list(cmd), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stderr[-3000:]
    return time.monotonic() - start


def kill_at_random(
    command: Callable[[int], Sequence[str]],
    check: Callable[[int], None],
    *,
    env: dict[str, str],
    cwd: Path,
    kills: int,
    seed: int,
    duration_s: float,
    earliest_s: float = 0.2,
    timeout_s: float = 600,
) -> Campaign:
    """Trials until `kills` kills have landed: trial t starts `command(t)` (a fresh output of its own),
    kills it (its whole process group, workers included) at a random moment, runs `command(t)` again
    to its end (it must resume what the killed run left) and calls `check(t)` on the result. A run
    that ends before its kill does not count; at most 3 * kills trials are made."""
    rng = random.Random(seed)
    campaign = Campaign(seed)
    trial = 0
    while campaign.landed < kills and trial < 3 * kills:
        moment = rng.uniform(earliest_s, max(duration_s, earliest_s + 0.1))
        campaign.moments_s.append(round(moment, 3))
        process = subprocess.Popen(
            list(command(trial)),
            env=env,
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            process.wait(timeout=moment)
            campaign.finished_early += 1
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            campaign.landed += 1
        _reap_group(process.pid)
        final = subprocess.run(
            list(command(trial)), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s
        )
        campaign.final_returncode, campaign.final_stderr = final.returncode, final.stderr[-3000:]
        if final.returncode != 0:
            return campaign
        check(trial)
        campaign.matched += 1
        trial += 1
    return campaign


def _reap_group(pgid: int) -> None:
    """Kill whatever of the group outlived its leader (decoding workers of a run that ended first)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kills_from_env(default: int) -> int:
    """`make faults` asks for a full campaign (STRM_FAULT_KILLS); the suite keeps a few."""
    return int(os.environ.get("STRM_FAULT_KILLS", default))


def seed_from_env(stage: int) -> int:
    """The campaign's seed (STRM_FAULT_SEED, 0 by default) plus a number of the stage's own, so the
    stages of one campaign draw different moments."""
    return int(os.environ.get("STRM_FAULT_SEED", 0)) + stage
