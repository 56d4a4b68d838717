"""Small heads and random tasks shared by the tests that hold the fast heads against the loop reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def assert_gradients_match_reference(variant: str, support, labels, query, query_labels) -> dict:
    """L_TM + 0.1 L_QC backpropagated through the fast heads and the loop reference (fresh seeded heads
    each) give the same gradients; returns the fast side's, by parameter name."""
    grads = []
    for side in ("fast", "reference"):
        heads = make_heads(variant)
        if side == "fast":
            out = heads(support, labels, query)
            trm, qc = out.trm_logits, out.qc_logits
        else:
            ref = reference_forward(heads, support, labels, query)
            trm, qc = ref["trm_logits"], ref["qc_logits"]
        loss = F.cross_entropy(trm, query_labels)
        if qc is not None:
            loss = loss + 0.1 * F.cross_entropy(qc, query_labels)
        loss.backward()
        grads.append({name: p.grad for name, p in heads.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "trm.0.k_linear.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], **TOL, msg=name)
    return grads[0]
