"""How long a person waits for `strm --help` and a stage's --help: the library (torch, the decoders) is
imported by the commands only, so help is Typer's alone. Goal: under 1 s on this 2-core CPU."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from benchmarks import Figure

COMMANDS = (["--help"], ["train-heads", "--help"], ["predict", "--help"], ["demo", "--help"])
ROUNDS = 3


def help_seconds() -> Figure:
    """The slowest command's median wall time over ROUNDS fresh processes (python -m stages.app)."""
    medians = {}
    for args in COMMANDS:
        times = []
        for _ in range(ROUNDS):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "stages.app", *args], check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        medians[" ".join(["strm", *args])] = round(statistics.median(times), 3)
    return Figure(max(medians.values()), "s", "<= 1", medians)


BENCHES = {"help_seconds": help_seconds}
