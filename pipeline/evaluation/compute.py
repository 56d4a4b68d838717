"""Parameters and FLOPs of the heads and the ResNet-50 trunk on one few-shot task: the paper's compute claims, counted.

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode, which counts matmul (mm, addmm, bmm,
baddbmm), convolution and scaled-dot-product-attention FLOPs as 2 x multiply-accumulates and nothing
else: softmax, LayerNorm, ReLU, pooling, sums and means are free. Its registry lacks the CPU kernel of
scaled-dot-product attention (`_scaled_dot_product_flash_attention_for_cpu`, forward and backward,
torch 2.14), so PLE's and Jnt-ST's attention would count 0 on CPU: `count_flops` adds torch's own
GPU-kernel formulas for it. The heads are counted on a
forward of this project's implementation (TRM's per-frame key and value rows, QC's one-matmul
distances), not of the released code's, so its algebra shows in the counts. Counts depend only on
shapes, hence are deterministic, and every per-video or per-query cost is linear in the number of
query videos. The trunk is torchvision's ResNet-50 children up to layer4 at image_size^2 pixels,
counted on one frame on the meta device (shapes only: the same count as a random-weight forward)
and multiplied by the task's frames: (way*shot + way*queries) * L.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import (
    FlopCounterMode,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from pipeline.heads import STRMHeads, build_heads


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_CPU_SDPA = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs FlopCounterMode counts while `fn()` runs (forward, and backward if fn calls it), CPU attention included."""
    with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
        fn()
    return int(counter.get_total_flops())


def random_task(
    heads: STRMHeads, way: int, shot: int, queries: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random patch features for one episode of `heads`' shapes: support [way*shot, L, P, D], its labels
    (grouped by class), query [way*queries, L, P, D] and the query labels."""
    g = torch.Generator().manual_seed(seed)
    shape = (heads.frames, heads.patches, heads.dim)
    support = torch.randn(way * shot, *shape, generator=g)
    query = torch.randn(way * queries, *shape, generator=g)
    return support, torch.arange(way).repeat_interleave(shot), query, torch.arange(way).repeat_interleave(queries)


def training_step_flops(
    heads: STRMHeads,
    support: torch.Tensor,
    support_labels: torch.Tensor,
    query: torch.Tensor,
    query_labels: torch.Tensor,
) -> int:
    """FLOPs of one training step on one task: forward, the loss, and its backward (the gradients it
    leaves are cleared again, so the heads are as before apart from dropout's random state)."""

    def step() -> None:
        heads.loss(heads(support, support_labels, query), query_labels).backward()

    heads.zero_grad(set_to_none=True)
    flops = count_flops(step)
    heads.zero_grad(set_to_none=True)
    return flops


@cache
def trunk_per_frame(image_size: int = 224) -> tuple[int, int]:
    """(parameters, forward FLOPs of one frame) of the ResNet-50 trunk: every child up to layer4."""
    from torchvision.models import resnet50

    with torch.device("meta"):
        trunk = nn.Sequential(*list(resnet50(weights=None).children())[:8])  # conv1 .. layer4
        frame = torch.empty(1, 3, image_size, image_size)
    return sum(p.numel() for p in trunk.parameters()), count_flops(lambda: trunk(frame))


@dataclass(frozen=True)
class TaskCompute:
    """Sizes and forward FLOPs of one `way`-way `shot`-shot task with `queries` query videos a class."""

    variant: str
    dim: int
    way: int
    shot: int
    queries: int
    params: int
    heads_flops: int
    trunk_params: int
    trunk_flops: int

    @property
    def total_flops(self) -> int:
        return self.heads_flops + self.trunk_flops


def task_compute(
    variant: str,
    dim: int = 2048,
    *,
    way: int = 5,
    shot: int = 5,
    queries: int = 1,
    image_size: int = 224,
    **options,
) -> TaskCompute:
    """Parameters and forward FLOPs of the `variant` heads (eval mode, random weights and inputs) on one
    task, and of the trunk on that task's clips. `options` go to build_heads (frames, patches, trm_dim, ...)."""
    torch.manual_seed(0)
    heads = build_heads(variant, dim, **options).eval()
    support, labels, query, _ = random_task(heads, way, shot, queries)
    with torch.no_grad():
        flops = count_flops(lambda: heads(support, labels, query))
    trunk_params, frame_flops = trunk_per_frame(image_size)
    videos = way * shot + way * queries
    return TaskCompute(
        variant=variant,
        dim=dim,
        way=way,
        shot=shot,
        queries=queries,
        params=sum(p.numel() for p in heads.parameters()),
        heads_flops=flops,
        trunk_params=trunk_params,
        trunk_flops=frame_flops * videos * heads.frames,
    )


def compute_table(
    variants: Sequence[str],
    dim: int = 2048,
    *,
    queries: Sequence[int] = (1, 4),
    baseline: str = "trm",
    **kwargs,
) -> list[dict[str, Any]]:
    """One row per (variant, queries a class): task_compute's fields, total_flops, and each of params,
    heads FLOPs and heads + trunk FLOPs over the `baseline` variant's on the same task (the paper
    states its costs relative to the TRM baseline). kwargs go to task_compute."""
    rows: list[dict[str, Any]] = []
    for q in queries:
        base = task_compute(baseline, dim, queries=q, **kwargs)
        for variant in variants:
            c = base if variant == baseline else task_compute(variant, dim, queries=q, **kwargs)
            rows.append(
                {
                    **asdict(c),
                    "total_flops": c.total_flops,
                    "params_vs_baseline": c.params / base.params,
                    "heads_flops_vs_baseline": c.heads_flops / base.heads_flops,
                    "total_flops_vs_baseline": c.total_flops / base.total_flops,
                    "baseline": baseline,
                }
            )
    return rows
