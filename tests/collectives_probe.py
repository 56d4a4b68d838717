"""`python tests/collectives_probe.py STAGE ARGS...`: the strm CLI with torch.distributed's collectives recorded.

Each rank writes $COLLECTIVES_LOG.<rank> (JSON): every collective called from Python, the devices of
the tensors it was handed (and its `device=` argument), and the file that called it. The DDP tests
check that every tensor is on the training device and that only pipeline/runtime/distributed.py calls them.
On CPU (gloo) the training device and the CPU are the same, so there the device check cannot catch a
collective built on the wrong device (only a GPU run can); the caller check is the one with force.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def assert_collectives_on(log: Path, device: str, ranks: int) -> None:
    """Every tensor handed to a collective was on `device`, and every collective was called from
    pipeline/runtime/distributed.py (or torch itself), never inline in a loop."""
    for rank in range(ranks):
        calls = json.loads(Path(f"{log}.{rank}").read_text())
        assert "all_reduce" in {c["op"] for c in calls}, calls  # the metric window of every log line
        for call in calls:
            assert all(d == device for d in call["devices"]), call
            assert call["caller"].endswith("pipeline/runtime/distributed.py") or "/torch/" in call["caller"], call


OPS = ("broadcast", "all_reduce", "broadcast_object_list", "all_gather", "all_gather_object", "reduce", "barrier")
calls: list[dict] = []


def _recording(name: str):
    real = getattr(dist, name)

    def record(*args, **kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        devices = [str(t.device) for t in tensors]
        if kwargs.get("device") is not None:
            devices.append(str(torch.device(kwargs["device"])))
        calls.append({"op": name, "devices": devices, "caller": inspect.stack()[1].filename})
        return real(*args, **kwargs)

    return record


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for op in OPS:
        setattr(dist, op, _recording(op))
    from stages.app import main

    try:
        main()
    finally:
        with open(f"{os.environ['COLLECTIVES_LOG']}.{os.environ.get('RANK', '0')}", "w") as f:
            json.dump(calls, f)
