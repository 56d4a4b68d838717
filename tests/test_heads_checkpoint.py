"""The authors' checkpoint importer, the project checkpoint format and `strm import-checkpoint`."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipeline.heads import build_heads, load_authors_checkpoint, load_heads, save_heads
from pipeline.training.checkpoints import resnet_trunk_state

FIXTURE = Path(__file__).parent / "fixtures" / "strm_official_golden.pt"


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(FIXTURE, weights_only=True)


def logits(heads, golden):
    with torch.no_grad():
        return heads(golden["support_patches"], golden["support_labels"], golden["query_patches"])


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def multi_gpu_spelling(state: dict) -> dict:
    """What DataParallel runs save: `.module.` after resnet, attn_pat, fr_enrich."""
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        out[f"{head}.module.{rest}" if head in ("resnet", "attn_pat", "fr_enrich") else key] = value
    return out


def test_wrapped_file_with_module_spelling(golden, tmp_path):
    path = tmp_path / "checkpoint.pt"
    state = multi_gpu_spelling(golden["strm_state_dict"])
    assert "attn_pat.module.key_proj.weight" in state
    torch.save({"iteration": 7, "model_state_dict": state, "optimizer_state_dict": {}, "scheduler": {}}, path)
    heads = load_authors_checkpoint(path)
    close(logits(heads, golden).logits, golden["fused_logits"])


def test_released_files_have_no_qc(golden):
    state = {k: v for k, v in golden["strm_state_dict"].items() if not k.startswith("new_dist_loss_post_pat")}
    heads = load_authors_checkpoint(state)
    assert not heads.has_qc and heads.qc is None
    assert any("QC" in line for line in heads.import_report.missing)
    out = logits(heads, golden)
    assert out.qc_logits is None and torch.equal(out.logits, out.trm_logits)
    close(out.logits, golden["trm_logits"])


def test_backbone_weights_come_back_separately(golden):
    from torchvision.models import resnet50

    from pipeline.features.backbones import get_backbone

    trunk = get_backbone("resnet50", pretrained=False).trunk.state_dict()
    source = {f"resnet.{k}": torch.randn_like(v) if v.is_floating_point() else v for k, v in trunk.items()}
    heads = load_authors_checkpoint(multi_gpu_spelling({**golden["strm_state_dict"], **source}))
    assert torch.equal(heads.backbone_state_dict["layer4.2.conv3.weight"], source["resnet.7.2.conv3.weight"])
    torchvision = resnet50()
    missing, unexpected = torchvision.load_state_dict(heads.backbone_state_dict, strict=False)
    assert not unexpected and set(missing) == {"fc.weight", "fc.bias"}  # torchvision's names, all but the classifier
    backbone = get_backbone("resnet50", pretrained=False)
    backbone.load_state_dict(resnet_trunk_state(heads.backbone_state_dict))  # strict: every key and shape fits
    assert torch.equal(backbone.trunk[7][2].conv3.weight, source["resnet.7.2.conv3.weight"])
    assert heads.import_report.backbone_tensors == len(trunk)
    assert not any(k.startswith(("trunk.", "layer")) for k in heads.state_dict())


def test_wrong_or_partial_files_are_refused(golden):
    with pytest.raises(ValueError, match="variant 'trx' does not have"):
        load_authors_checkpoint(golden["strm_state_dict"], variant="trx")
    with pytest.raises(ValueError, match="lacks the PLE"):
        load_authors_checkpoint(golden["trx_state_dict"], variant="strm")
    no_gamma = {k: v for k, v in golden["strm_state_dict"].items() if k != "attn_pat.gamma"}
    with pytest.raises(ValueError, match="ple.gamma"):
        load_authors_checkpoint(no_gamma)
    with pytest.raises(ValueError, match="not an STRM or TRX checkpoint"):
        load_authors_checkpoint({"fc.weight": torch.zeros(2, 2)})
    qc_for_one = {
        **golden["trx_state_dict"],
        "new_dist_loss_post_pat.0.clsW.weight": torch.zeros(32, 128),
        "new_dist_loss_post_pat.0.clsW.bias": torch.zeros(32),
    }
    with pytest.raises(ValueError, match="some cardinalities only"):
        load_authors_checkpoint(qc_for_one, variant="trx")


class _Payload:
    def __reduce__(self):
        return (print, ("code from the checkpoint ran",))


def test_loading_never_runs_code_from_the_file(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {"x": _Payload()}}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_authors_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError):
        load_heads(path)


def test_project_format_round_trip(tmp_path):
    heads = build_heads(
        "strm",
        16,
        frames=8,
        patches=4,
        trm_dim=12,
        cardinalities=(1, 3),
        tuple_keep=0.5,
        scaled_attention=True,
        ple="mixer",
        fle="attention",
        lambda_qc=0.3,
    )
    heads.set_feature_stats(torch.randn(16), torch.rand(16) + 0.5)
    path = tmp_path / "heads" / "last.pt"
    save_heads(path, heads, task_index=12, config={"lr": 1e-3})
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "strm-heads/1" and raw["variant"] == "strm" and raw["dim"] == 16
    assert raw["options"]["cardinalities"] == [1, 3] and raw["task_index"] == 12
    loaded, checkpoint = load_heads(path)
    assert checkpoint["config"] == {"lr": 1e-3} and not loaded.training
    assert loaded.options == heads.options and loaded.cardinalities == (1, 3) and loaded.lambda_qc == 0.3
    x, labels, q = torch.randn(6, 8, 4, 16), torch.tensor([2, 0, 1, 1, 0, 2]), torch.randn(3, 8, 4, 16)
    heads.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, labels, q).logits, heads(x, labels, q).logits)
    assert not list(path.parent.glob("*.partial"))


def test_load_heads_refuses_an_authors_file(golden):
    with pytest.raises(ValueError, match="load_authors_checkpoint"):
        load_heads(golden["strm_state_dict"])


def test_import_checkpoint_stage(golden, tmp_path):
    from stages.app import app

    src, dst = tmp_path / "authors.pt", tmp_path / "out" / "strm.pt"
    released = {k: v for k, v in golden["strm_state_dict"].items() if not k.startswith("new_dist")}
    released["resnet.0.weight"] = torch.randn(4, 3, 7, 7)
    released["resnet.7.0.bn1.running_mean"] = torch.randn(4)
    torch.save({"model_state_dict": multi_gpu_spelling(released)}, src)
    result = CliRunner().invoke(app, ["import-checkpoint", str(src), str(dst)])
    assert result.exit_code == 0, result.output
    assert "found" in result.output and "missing" in result.output and "QC" in result.output
    assert "norm_v" in result.output  # dropped, and said so
    heads, checkpoint = load_heads(dst)
    assert not heads.has_qc and torch.equal(checkpoint["backbone"]["trunk.0.weight"], released["resnet.0.weight"])
    assert torch.equal(checkpoint["backbone"]["trunk.7.0.bn1.running_mean"], released["resnet.7.0.bn1.running_mean"])
    close(logits(heads, golden).logits, golden["trm_logits"])
    # The imported file keeps the authors' feature recipe (raw [0, 1] pixels, 256/224, 4x4), its own
    # sha256 as the weights, so predict and finetune rebuild the right input.
    from pipeline.training.checkpoints import load_checkpoint

    imported = load_checkpoint(dst)
    assert imported.kind == "finetune" and not imported.notes
    assert imported.recipe.mean is None and (imported.recipe.short_side, imported.recipe.crop) == (256, 224)
    assert imported.recipe.weights == imported.sha256 != load_checkpoint(src).recipe.weights

    bad = CliRunner().invoke(app, ["import-checkpoint", str(src), str(dst), "--variant", "trx"])
    assert bad.exit_code == 1 and "does not have" in bad.output
    missing = CliRunner().invoke(app, ["import-checkpoint", str(tmp_path / "nope.pt"), str(dst)])
    assert missing.exit_code == 1 and "nope.pt" in missing.output
    unknown = CliRunner().invoke(app, ["import-checkpoint", str(src), str(dst), "--variant", "xyz"])
    assert unknown.exit_code == 2
