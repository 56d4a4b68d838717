"""Small heads and random tasks shared by the tests that hold the fast heads against the loop reference."""
from __future__ import annotations

import torch

from pipeline.heads import build_heads
from pipeline.heads.reference import reference_forward

DIM, FRAMES, PATCHES = 16, 8, 4
SMALL = {"frames": FRAMES, "patches": PATCHES, "trm_dim": 12}
TOL = {"rtol": 1e-4, "atol": 1e-5}


def make_heads(variant: str = "strm", seed: int = 0, gamma: float = 0.7, **options):
    """Seeded small heads in eval mode; gamma starts at 0 in training, so give the attention branch a say."""
    torch.manual_seed(seed)
    heads = build_heads(variant, DIM, **{**SMALL, **options})
    with torch.no_grad():
        for module in heads.modules():
            if getattr(module, "gamma", None) is not None:
                module.gamma.fill_(gamma)
    return heads.eval()


def random_task(way: int, shot: int, queries: int, seed: int):
    """Support, shuffled labels and queries of one way-shot task with `queries` videos a class."""
    g = torch.Generator().manual_seed(seed)
    support = torch.randn(way * shot, FRAMES, PATCHES, DIM, generator=g)
    query = torch.randn(way * queries, FRAMES, PATCHES, DIM, generator=g)
    labels = torch.arange(way).repeat_interleave(shot)[torch.randperm(way * shot, generator=g)]
    return support, labels, query


def assert_matches_reference(heads, support, labels, query) -> None:
    """The fast forward's TRM, combined and QC logits equal the loop reference's."""
    with torch.no_grad():
        fast = heads(support, labels, query)
        ref = reference_forward(heads, support, labels, query)
    torch.testing.assert_close(fast.trm_logits, ref["trm_logits"], **TOL)
    torch.testing.assert_close(fast.logits, ref["logits"], **TOL)
    if heads.has_qc:
        torch.testing.assert_close(fast.qc_logits, ref["qc_logits"], **TOL)
    else:
        assert fast.qc_logits is None and ref["qc_logits"] is None
