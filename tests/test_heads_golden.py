"""The authors' modules' outputs (tests/fixtures/strm_official_golden.pt, STRM_SPEC section 12) reproduced.

Tolerance: rtol 1e-4, plus an absolute floor of 1e-5 x the tensor's largest magnitude for the
entries that are near 0 (float32 sums taken in another order differ there by ~1e-6 absolute).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.heads import load_authors_checkpoint
from pipeline.heads.reference import reference_forward

FIXTURE = Path(__file__).parent / "fixtures" / "strm_official_golden.pt"


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(FIXTURE, weights_only=True)


def test_strm_every_intermediate_and_logit(golden):
    heads = load_authors_checkpoint(golden["strm_state_dict"])
    assert heads.has_qc and not heads.training
    assert heads.options["trm_dim"] == golden["config"]["trans_linear_out_dim"]
    support, labels, query = golden["support_patches"], golden["support_labels"], golden["query_patches"]
    with torch.no_grad():
        emb_s, emb_q = heads.encode(support, intermediates=True), heads.encode(query, intermediates=True)
        out = heads.relate(emb_s, labels, emb_q)
        forward = heads(support, labels, query)
    close(emb_s.ple_patches, golden["ple_out_support"])
    for name, emb in (("support", emb_s), ("query", emb_q)):
        close(emb.H, golden[f"H_{name}"])
        close(emb.E, golden[f"E_{name}"])
    close(out.trm_logits, golden["trm_logits"])
    close(out.qc_logits, golden["qc_logits"])
    close(out.logits, golden["fused_logits"])
    torch.testing.assert_close(forward.logits, out.logits)


def test_reference_reproduces_the_authors_too(golden):
    heads = load_authors_checkpoint(golden["strm_state_dict"])
    with torch.no_grad():
        ref = reference_forward(heads, golden["support_patches"], golden["support_labels"], golden["query_patches"])
    close(ref["ple_patches_support"], golden["ple_out_support"])
    close(ref["E_query"], golden["E_query"])
    close(ref["logits"], golden["fused_logits"])


def test_trx_logits(golden):
    heads = load_authors_checkpoint(golden["trx_state_dict"], variant="trx")
    assert heads.cardinalities == (2, 3) and not heads.has_qc and heads.ple is None and heads.fle is None
    with torch.no_grad():
        out = heads(golden["support_patches"], golden["support_labels"], golden["query_patches"])
    close(out.logits, golden["trx_logits"])
    assert out.qc_logits is None and torch.equal(out.logits, out.trm_logits)


def test_predictions_match(golden):
    """Not only close: the argmax of the fused logits is the authors' for every query."""
    heads = load_authors_checkpoint(golden["strm_state_dict"])
    with torch.no_grad():
        out = heads(golden["support_patches"], golden["support_labels"], golden["query_patches"])
    assert torch.equal(out.logits.argmax(-1), golden["fused_logits"].argmax(-1))
