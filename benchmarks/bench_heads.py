"""Heads: forward + backward of one training task, the fast heads vs the loop-structured reference.

One 5-way 5-shot task with 4 queries a class at D = 2048 (ResNet-50 features, L = 8, 16 patches),
CPU float32, train mode (dropout on), loss L_TM + 0.1 L_QC summed over queries. Each side lives
in its own fresh process (the same seeded model and task), so its peak memory is its own: peak
RSS during the steps minus the RSS once model and inputs exist. The two take turns, one step at a
time (never at once), and each side's time is its best of `REPEATS` steps after a warm-up step.
"""
from __future__ import annotations

import multiprocessing
import resource
import time

from benchmarks import Figure

WAY, SHOT, QUERIES, DIM = 5, 5, 4, 2048
REPEATS = 2


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _worker(side: str, conn) -> None:
    """Child process: build the seeded heads and task once, then time `side`'s step on each request."""
    import torch

    from pipeline.heads import HeadsOutput, build_heads
    from pipeline.heads.reference import reference_forward

    torch.manual_seed(0)
    heads = build_heads("strm", DIM).train()
    with torch.no_grad():
        heads.ple.gamma.fill_(0.5)  # as after some training: the attention branch is live
    support = torch.randn(WAY * SHOT, 8, 16, DIM)
    query = torch.randn(WAY * QUERIES, 8, 16, DIM)
    labels = torch.arange(WAY).repeat_interleave(SHOT)[torch.randperm(WAY * SHOT)]
    query_labels = torch.arange(WAY).repeat_interleave(QUERIES)

    def step() -> None:
        heads.zero_grad(set_to_none=True)
        if side == "fast":
            out = heads(support, labels, query)
        else:
            ref = reference_forward(heads, support, labels, query)
            out = HeadsOutput(ref["logits"], ref["trm_logits"], ref["qc_logits"])
        heads.loss(out, query_labels).backward()

    baseline = _rss_bytes()
    conn.send(torch.get_num_threads())
    while conn.recv() == "step":
        start = time.perf_counter()
        step()
        conn.send(time.perf_counter() - start)
    conn.send((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline) / 2**20)


def heads_speedup_vs_loops() -> Figure:
    """reference time / fast time for one training step (forward + backward), steps interleaved."""
    ctx = multiprocessing.get_context("spawn")
    sides = ("fast", "reference")
    pipes, procs, times = {}, [], {side: [] for side in sides}
    for side in sides:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(side, child), daemon=True)
        proc.start()
        pipes[side] = parent
        procs.append(proc)
    threads = [pipes[side].recv() for side in sides][0]
    for _ in range(1 + REPEATS):  # the first round warms up (allocator, kernels)
        for side in sides:  # alternate, so a busy spell on a shared machine hits both sides
            pipes[side].send("step")
            times[side].append(pipes[side].recv())
    peaks = {}
    for side in sides:
        pipes[side].send("stop")
        peaks[side] = pipes[side].recv()
    for proc in procs:
        proc.join()
    fast, ref = min(times["fast"][1:]), min(times["reference"][1:])
    return Figure(
        value=ref / fast,
        unit="x",
        goal=">= 1.5x",
        details={
            "task": f"{WAY}-way {SHOT}-shot, {QUERIES} queries a class, D={DIM}, L=8, 16 patches, strm, CPU float32",
            "fast_s": round(fast, 3),
            "reference_s": round(ref, 3),
            "fast_peak_mb": round(peaks["fast"], 1),
            "reference_peak_mb": round(peaks["reference"], 1),
            "threads": threads,
        },
    )


BENCHES = {"heads_speedup_vs_loops": heads_speedup_vs_loops}
