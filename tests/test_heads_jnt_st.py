"""Jnt-ST (paper Table 3): joint self-attention over all L*P patch tokens in place of PLE and FLE.

Sizes by hand, the fast heads against the loop reference, that attention really crosses frames,
the checkpoint round trip and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from small_heads import DIM, FRAMES, PATCHES, SMALL, make_heads, random_task

from pipeline.heads import build_heads, load_heads, save_heads
from pipeline.heads.reference import reference_forward

JOINT = ("jnt-st-1", "jnt-st-2")


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_at_d2048():
    D, D_trm, hidden = 2048, 1152, 2048 // 2
    # One Jnt-ST layer: Q, K, V Linear(D, D) with bias, psi D -> D/2 -> D/2 -> D with biases, gamma.
    layer = 3 * (D * D + D) + (D * hidden + hidden) + (hidden * hidden + hidden) + (hidden * D + D) + 1
    # TRM, w = 2: k and v Linear(2D, D') with bias, LayerNorm_k over D' (weight and bias).
    trm = 2 * (2 * D * D_trm + D_trm) + 2 * D_trm
    assert (layer, trm) == (17_836_033, 9_441_792)  # STRM_SPEC section 8: PLE has the same block shape
    for variant, layers in (("jnt-st-1", 1), ("jnt-st-2", 2)):
        heads = build_heads(variant, D)
        assert heads.ple is None and heads.fle is None and heads.qc is None
        assert n_params(heads.joint) == layers * layer
        assert n_params(heads) == layers * layer + trm


@pytest.mark.parametrize("variant", JOINT)
@pytest.mark.parametrize(("way", "shot", "queries"), [(1, 1, 1), (5, 5, 2), (3, 7, 3), (10, 1, 2), (2, 4, 1)])
def test_fast_matches_reference(variant, way, shot, queries):
    heads = make_heads(variant, seed=way * 10 + shot)
    support, labels, query = random_task(way, shot, queries, seed=way + shot + queries)
    with torch.no_grad():
        fast = heads(support, labels, query)
        ref = reference_forward(heads, support, labels, query)
        emb = heads.encode(support, intermediates=True)
    torch.testing.assert_close(fast.logits, ref["logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(emb.ple_patches, ref["ple_patches_support"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(emb.E, emb.H)  # no FLE: E = H
    assert fast.qc_logits is None and ref["qc_logits"] is None


@pytest.mark.parametrize(
    "options", [{"scaled_attention": True}, {"gamma_zero": True}, {"qc": True}, {"psi_dim": 6}], ids=str
)
def test_options_match_reference(options):
    heads = make_heads("jnt-st-2", **options)
    support, labels, query = random_task(4, 3, 2, seed=3)
    with torch.no_grad():
        fast = heads(support, labels, query)
        ref = reference_forward(heads, support, labels, query)
    torch.testing.assert_close(fast.logits, ref["logits"], rtol=1e-4, atol=1e-5)
    assert (fast.qc_logits is not None) == bool(options.get("qc"))


def test_attention_crosses_frames():
    """Changing frame 0 moves H of every other frame under Jnt-ST, and of none under per-frame PLE."""
    x = torch.randn(1, FRAMES, PATCHES, DIM)
    changed = x.clone()
    changed[:, 0] += 1.0
    for variant, crosses in (("jnt-st-1", True), ("ple-trm", False)):
        heads = make_heads(variant)
        with torch.no_grad():
            before = heads.encode(x, intermediates=True).H[0, 1:]
            after = heads.encode(changed, intermediates=True).H[0, 1:]
        moved = (after - before).abs().amax(dim=-1)  # per frame 1..L-1
        assert bool((moved > 1e-4).all()) == crosses, variant


def test_positions_cover_frame_and_patch():
    """Swapping two patches within a frame, or two whole frames, changes the output: the PE tells them apart."""
    heads = make_heads("jnt-st-1", gamma=0.0)  # no attention: only the PE distinguishes positions
    x = torch.randn(1, FRAMES, PATCHES, DIM)
    with torch.no_grad():
        base = heads.encode(x, intermediates=True).ple_patches
        patch_swap = heads.encode(x[:, :, [1, 0, 2, 3]], intermediates=True).ple_patches[:, :, [1, 0, 2, 3]]
        frame_swap = heads.encode(x[:, [1, 0, *range(2, FRAMES)]], intermediates=True).ple_patches
    assert not torch.allclose(patch_swap, base, atol=1e-4)
    assert not torch.allclose(frame_swap[:, [1, 0, *range(2, FRAMES)]], base, atol=1e-4)


@pytest.mark.parametrize("variant", JOINT)
def test_checkpoint_round_trip(variant, tmp_path):
    heads = make_heads(variant, seed=5)
    path = tmp_path / "heads.pt"
    save_heads(path, heads)
    loaded, checkpoint = load_heads(path)
    assert loaded.variant == variant and checkpoint["options"]["joint"] == int(variant[-1])
    assert len(loaded.joint.layers) == int(variant[-1])
    support, labels, query = random_task(3, 2, 2, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(support, labels, query).logits, heads(support, labels, query).logits)
    for name, tensor in heads.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.parametrize("variant", JOINT)
def test_gradients_reach_the_joint_block_and_match_reference(variant):
    support, labels, query = random_task(3, 2, 2, seed=7)
    query_labels = torch.arange(3).repeat_interleave(2)
    grads = []
    for side in ("fast", "reference"):
        heads = make_heads(variant)
        logits = (
            heads(support, labels, query).logits
            if side == "fast"
            else reference_forward(heads, support, labels, query)["logits"]
        )
        F.cross_entropy(logits, query_labels).backward()
        grads.append({name: p.grad for name, p in heads.named_parameters()})
    joint = [name for name in grads[0] if name.startswith("joint.")]
    assert len(joint) == 9 * int(variant[-1])  # qkv, psi (3 layers) weight and bias, gamma per layer
    for name in joint:
        assert grads[0][name] is not None and grads[0][name].abs().sum() > 0, name
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_fresh_heads_learn_gamma():
    """At init gamma = 0, so Q/K/V get no gradient yet; gamma itself must, or attention never switches on."""
    torch.manual_seed(0)
    heads = build_heads("jnt-st-1", DIM, **SMALL).train()
    support, labels, query = random_task(3, 2, 2, seed=8)
    heads.loss(heads(support, labels, query), torch.arange(3).repeat_interleave(2)).backward()
    assert heads.joint.layers[0].gamma.grad.abs().item() > 0


def test_joint_option_checks():
    with pytest.raises(ValueError, match="joint replaces PLE and FLE"):
        build_heads("strm", DIM, **SMALL, joint=1)
    with pytest.raises(ValueError, match="number of layers"):
        build_heads("jnt-st-1", DIM, **SMALL, joint=0)
    assert len(build_heads("trm", DIM, **SMALL, joint=3).joint.layers) == 3
