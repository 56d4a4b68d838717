"""Heads: one training step of the fast heads as a fraction of the machine's float32 matmul rate.

One 5-way 5-shot task with 4 queries a class at D = 2048 (ResNet-50 features, L = 8, 16 patches),
CPU float32, train mode (dropout on), loss L_TM + 0.1 L_QC summed over queries. The step's FLOPs are
counted (`pipeline.evaluation.compute.training_step_flops`: FlopCounterMode over forward + backward, matmul,
convolution and attention FLOPs as 2 x multiply-accumulates, nothing else); over the step's time
they give its rate, compared with the best rate of a MATMUL_SIZE^3 float32 torch.matmul timed in the
same process (same threads), the ceiling that products of the heads' sizes can reach. Each side
(fast heads, loop reference) lives in its own fresh process (the same seeded model and task), so
its peak memory is its own: peak RSS during the steps minus the RSS once model and inputs exist.
The two take turns, one step at a time (never at once), the matmul timings between them, and each
time is its best of `REPEATS` after a warm-up round. The reference's time stays in the details.
"""

from __future__ import annotations

import multiprocessing
import resource
import time

from benchmarks import Figure

WAY, SHOT, QUERIES, DIM = 5, 5, 4, 2048
REPEATS = 2
MATMUL_SIZE, MATMUL_REPEATS = 2048, 5


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _worker(side: str, conn) -> None:
    """Child process: build the seeded heads and task once, then answer requests: "step" (time `side`'s
    training step), "matmul" (best time of MATMUL_REPEATS matmuls), "stop" (peak MB and, for the fast
    side, the step's counted FLOPs)."""
    import torch

    from pipeline.evaluation.compute import training_step_flops
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
    a, b, product = (torch.randn(MATMUL_SIZE, MATMUL_SIZE) for _ in range(3))

    def step() -> None:
        heads.zero_grad(set_to_none=True)
        if side == "fast":
            out = heads(support, labels, query)
        else:
            ref = reference_forward(heads, support, labels, query)
            out = HeadsOutput(ref["logits"], ref["trm_logits"], ref["qc_logits"])
        heads.loss(out, query_labels).backward()

    def matmul() -> float:
        best = float("inf")
        for _ in range(MATMUL_REPEATS):
            start = time.perf_counter()
            torch.matmul(a, b, out=product)
            best = min(best, time.perf_counter() - start)
        return best

    baseline = _rss_bytes()
    conn.send(torch.get_num_threads())
    while (request := conn.recv()) != "stop":
        if request == "step":
            start = time.perf_counter()
            step()
            conn.send(time.perf_counter() - start)
        else:
            conn.send(matmul())
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline) / 2**20
    flops = training_step_flops(heads, support, labels, query, query_labels) if side == "fast" else None
    conn.send((peak, flops))


def heads_fraction_of_matmul_peak() -> Figure:
    """(counted FLOPs / best fast step time) / best float32 matmul rate, steps and matmuls interleaved."""
    ctx = multiprocessing.get_context("spawn")
    sides = ("fast", "reference")
    pipes, procs, times = {}, [], {side: [] for side in sides}
    matmul_times = []
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
        pipes["fast"].send("matmul")
        matmul_times.append(pipes["fast"].recv())
    results = {}
    for side in sides:
        pipes[side].send("stop")
        results[side] = pipes[side].recv()
    for proc in procs:
        proc.join()
    fast, ref = min(times["fast"][1:]), min(times["reference"][1:])
    flops = results["fast"][1]
    step_rate = flops / fast
    matmul_rate = 2 * MATMUL_SIZE**3 / min(matmul_times[1:])
    return Figure(
        value=step_rate / matmul_rate,
        unit="of matmul peak",
        goal=">= 0.75",
        details={
            "task": f"{WAY}-way {SHOT}-shot, {QUERIES} queries a class, D={DIM}, L=8, 16 patches, strm, CPU float32",
            "step_gflop": round(flops / 1e9, 2),
            "fast_s": round(fast, 3),
            "reference_s": round(ref, 3),
            "step_gflop_per_s": round(step_rate / 1e9, 1),
            "matmul_gflop_per_s": round(matmul_rate / 1e9, 1),
            "matmul": f"{MATMUL_SIZE}x{MATMUL_SIZE} @ {MATMUL_SIZE}x{MATMUL_SIZE}",
            "fast_peak_mb": round(results["fast"][0], 1),
            "reference_peak_mb": round(results["reference"][0], 1),
            "threads": threads,
        },
    )


BENCHES = {"heads_fraction_of_matmul_peak": heads_fraction_of_matmul_peak}
