"""Checkpoints: the authors' released STRM/TRX files (import) and the project's own format.

Every file is read with torch.load(weights_only=True): plain tensors and containers only, no code.

Authors' files (STRM_SPEC section 9): a bare state dict or {"model_state_dict": ..., ...}; keys may
carry `.module.` (multi-GPU runs). Every size is read from the tensors' shapes. The PLE's three
projections are stacked into the one Q|K|V layer used here; the unused `norm_v` and the positional
tables (recomputed, and checked) are dropped; `resnet.<i>.*` goes to a separate backbone state dict
under torchvision's ResNet names (`layer4.2.conv3.weight`; `backbones.resnet_trunk_state` renames
that for the project's `Backbone` module). Released files have no QC weights: the heads are then
built without QC and their logits are the TRM logits alone.

Project format: {"format": "strm-heads/1", "variant", "dim", "options" (the resolved build_heads
kwargs), "model": state_dict, ...extra keys (optimizer, scheduler, rng, ...)}.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.heads.model import STRMHeads, build_heads
from pipeline.heads.pe import sinusoid_table
from pipeline.runtime.files import replace_durably

FORMAT = "strm-heads/1"

_PLE_KEYS = {"Bot_MLP.inp_fc": "psi.0", "Bot_MLP.hid_fc": "psi.2", "Bot_MLP.out_fc": "psi.4"}
_FLE_KEYS = {
    "Tok_MLP.inp_fc": "token_mlp.0",
    "Tok_MLP.out_fc": "token_mlp.2",
    "Bot_MLP.inp_fc": "channel_mlp.0",
    "Bot_MLP.out_fc": "channel_mlp.2",
}

# torchvision ResNet-50's children up to avgpool, in order (the authors' `resnet` is children 0..8 of
# it, TRX's too); the `resnet50` trunk is the first eight, numbered 0..7.
RESNET_CHILDREN = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")


@dataclass
class ImportReport:
    """What an authors' file held and what became of it (printed by `strm import-checkpoint`)."""

    variant: str
    sizes: dict[str, Any]
    found: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    has_qc: bool = False
    backbone_tensors: int = 0


def _read(path_or_dict: str | os.PathLike | Mapping, map_location: str | torch.device = "cpu") -> dict:
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict)
    loaded = torch.load(Path(path_or_dict), map_location=map_location, weights_only=True)
    if not isinstance(loaded, dict):
        raise ValueError(f"{path_or_dict}: holds a {type(loaded).__name__}, not a dict of tensors")
    return loaded


def _authors_state_dict(raw: dict) -> dict[str, torch.Tensor]:
    """Unwrap {"model_state_dict": ...}, drop `.module.`/`module.` from every key."""
    for wrapper in ("model_state_dict", "state_dict"):
        if isinstance(raw.get(wrapper), Mapping):
            raw = dict(raw[wrapper])
            break
    state = {}
    for key, value in raw.items():
        if not torch.is_tensor(value):
            raise ValueError(f"not a state dict: entry {key!r} is a {type(value).__name__}, not a tensor")
        state[re.sub(r"(^|\.)module\.", r"\1", key)] = value
    return state


def _sizes(state: dict[str, torch.Tensor], frames: int | None, patches: int) -> dict[str, Any]:
    trm_ids = sorted({int(m.group(1)) for k in state if (m := re.match(r"transformers\.(\d+)\.k_linear\.weight$", k))})
    if not trm_ids:
        raise ValueError("no TRM weights (transformers.<i>.k_linear.weight): not an STRM or TRX checkpoint")
    for source in ("transformers.0.pe.pe", "attn_pat.query_proj.weight", "fr_enrich.Bot_MLP.inp_fc.weight"):
        if source in state:
            dim = state[source].shape[-1]
            break
    else:
        raise ValueError("cannot tell the feature dim D: no transformers.0.pe.pe, attn_pat or fr_enrich weights")
    cards, trm_dim = [], None
    for i in trm_ids:
        weight = state[f"transformers.{i}.k_linear.weight"]
        if weight.shape[1] % dim:
            raise ValueError(f"transformers.{i}.k_linear takes {weight.shape[1]} inputs, not a multiple of D={dim}")
        cards.append(weight.shape[1] // dim)
        trm_dim = weight.shape[0]
    if "fr_enrich.Tok_MLP.inp_fc.weight" in state:
        frames = frames or state["fr_enrich.Tok_MLP.inp_fc.weight"].shape[0]
    frames = frames or 8
    sizes: dict[str, Any] = {
        "dim": dim,
        "frames": frames,
        "patches": patches,
        "cardinalities": cards,
        "trm_dim": trm_dim,
    }
    if "attn_pat.Bot_MLP.inp_fc.weight" in state:
        sizes["psi_dim"] = state["attn_pat.Bot_MLP.inp_fc.weight"].shape[0]
    if "new_dist_loss_post_pat.0.clsW.weight" in state:
        sizes["qc_dim"] = state["new_dist_loss_post_pat.0.clsW.weight"].shape[0]
    return sizes


def _check_pe(key: str, table: torch.Tensor, tokens: int, report: ImportReport) -> None:
    """The authors' PE buffer must be the spec's table (it is recomputed here, not loaded)."""
    table = table.reshape(-1, table.shape[-1]).float()
    if table.shape[0] != int(tokens * 1.5):
        raise ValueError(
            f"{key} holds {table.shape[0]} positions; {tokens} tokens need {int(tokens * 1.5)} "
            "(pass frames=/patches= matching the checkpoint)"
        )
    diff = (table - sinusoid_table(table.shape[1], table.shape[0])).abs().max().item()
    if diff > 1e-5:
        report.notes.append(f"{key} differs from the spec's sinusoid table by up to {diff:.3g}; the spec's is used")


def _map_keys(state: dict[str, torch.Tensor], heads: STRMHeads, report: ImportReport) -> tuple[dict, dict]:
    """Split the authors' state into (our heads' state dict, torchvision backbone state dict)."""
    ours: dict[str, torch.Tensor] = {}
    backbone: dict[str, torch.Tensor] = {}
    card_index = {w: i for i, w in enumerate(heads.cardinalities)}
    cards = report.sizes["cardinalities"]
    used: set[str] = set()

    def take(src: str, dst: str) -> None:
        if src in state:
            ours[dst] = state[src]
            used.add(src)

    for kind in ("weight", "bias"):
        parts = [f"attn_pat.{name}.{kind}" for name in ("query_proj", "key_proj", "value_conv")]
        if all(p in state for p in parts):
            ours[f"ple.qkv.{kind}"] = torch.cat([state[p] for p in parts])
            used.update(parts)
        for src, dst in _PLE_KEYS.items():
            take(f"attn_pat.{src}.{kind}", f"ple.{dst}.{kind}")
        for src, dst in _FLE_KEYS.items():
            take(f"fr_enrich.{src}.{kind}", f"fle.{dst}.{kind}")
        for i, w in enumerate(cards):
            j = card_index[w]
            for name in ("k_linear", "v_linear", "norm_k"):
                take(f"transformers.{i}.{name}.{kind}", f"trm.{j}.{name}.{kind}")
            take(f"new_dist_loss_post_pat.{i}.clsW.{kind}", f"qc.{j}.proj.{kind}")
    take("attn_pat.gamma", "ple.gamma")

    for key, value in state.items():
        if key in used:
            continue
        if key.startswith("resnet."):
            _, child, rest = key.split(".", 2)
            if not child.isdigit() or int(child) >= len(RESNET_CHILDREN):
                raise ValueError(f"{key}: not a ResNet-50 child of the authors' backbone")
            backbone[f"{RESNET_CHILDREN[int(child)]}.{rest}"] = value
        elif key.endswith(".pe.pe"):
            tokens = heads.patches if key.startswith("attn_pat.") else heads.frames
            _check_pe(key, value, tokens, report)
        elif re.fullmatch(r"transformers\.\d+\.norm_v\.(weight|bias)", key):
            report.ignored.append(f"{key} (built but never applied by the released code)")
        else:
            report.ignored.append(f"{key} (not part of the STRM heads)")
    return ours, backbone


_GROUPS = {
    "ple.": "PLE (attn_pat)",
    "fle.": "FLE (fr_enrich)",
    "joint.": "Jnt-ST (never released)",
    "trm.": "TRM (transformers)",
    "qc.": "QC (new_dist_loss_post_pat)",
}


def _groups(keys: list[str]) -> str:
    """Which blocks (authors' names) a list of our state-dict keys belongs to."""
    return ", ".join(label for prefix, label in _GROUPS.items() if any(k.startswith(prefix) for k in keys))


def load_authors_checkpoint(
    path_or_state_dict: str | os.PathLike | Mapping,
    variant: str = "strm",
    *,
    frames: int | None = None,
    patches: int = 16,
) -> STRMHeads:
    """Heads (eval mode) from an authors' STRM/TRX checkpoint; sizes are read from the tensors.

    The returned module also carries `backbone_state_dict` (the file's `resnet.<i>.*` weights under
    torchvision ResNet-50 names, e.g. `layer4.2.conv3.weight`; empty when the file has none) and
    `import_report` (an ImportReport). Without QC weights in the file `has_qc` is False and the
    logits are the TRM logits alone. Missing weights for the requested variant raise ValueError.
    """
    state = _authors_state_dict(_read(path_or_state_dict))
    sizes = _sizes(state, frames, patches)
    qc_present = [f"new_dist_loss_post_pat.{i}.clsW.weight" in state for i in range(len(sizes["cardinalities"]))]
    if any(qc_present) and not all(qc_present):
        raise ValueError("QC weights (new_dist_loss_post_pat.<i>.clsW) are present for some cardinalities only")
    report = ImportReport(variant=variant, sizes=sizes, has_qc=all(qc_present))
    options = {k: v for k, v in sizes.items() if k != "dim"}
    heads = build_heads(variant, sizes["dim"], **options, qc=report.has_qc)
    ours, backbone = _map_keys(state, heads, report)

    expected = heads.state_dict()
    missing = [k for k in expected if k not in ours and not k.startswith("feature_")]
    if missing:
        raise ValueError(
            f"checkpoint lacks the {_groups(missing)} weights that variant {variant!r} needs "
            f"({len(missing)} tensors, e.g. {missing[0]})"
        )
    extra = sorted(set(ours) - set(expected))
    if extra:
        raise ValueError(
            f"checkpoint holds {_groups(extra)} weights that variant {variant!r} does not have "
            "(a TRX file needs variant 'trx', an STRM file variant 'strm')"
        )
    heads.load_state_dict({**expected, **ours})
    heads.eval()

    for prefix, label in _GROUPS.items():
        count = sum(1 for k in ours if k.startswith(prefix))
        if count:
            report.found.append(f"{label}: {count} tensors")
    if backbone:
        report.found.append(f"backbone (resnet): {len(backbone)} tensors")
    report.backbone_tensors = len(backbone)
    if not report.has_qc:
        report.missing.append("QC (new_dist_loss_post_pat.*.clsW): absent, logits are the TRM logits alone")
    if not backbone:
        report.missing.append("backbone (resnet.*): absent")
    heads.backbone_state_dict = backbone
    heads.import_report = report
    return heads


def save_heads(path: str | os.PathLike, heads: STRMHeads, **extra) -> None:
    """Write heads in the project format, plus `extra` entries (plain tensors/numbers/strings/containers).

    Written to a temporary name then renamed, so an interrupted save never leaves a truncated file.
    """
    heads = getattr(heads, "module", heads)  # a DistributedDataParallel wrapper
    checkpoint = {
        "format": FORMAT,
        "variant": heads.variant,
        "dim": heads.dim,
        "options": dict(heads.options),
        "model": heads.state_dict(),
        **extra,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(checkpoint, partial)
    replace_durably(partial, path)  # data on the disk before the rename: a resume trusts it


def load_heads(
    path_or_dict: str | os.PathLike | Mapping, map_location: str | torch.device = "cpu"
) -> tuple[STRMHeads, dict]:
    """(heads in eval mode, the whole checkpoint dict) from a project-format checkpoint."""
    checkpoint = _read(path_or_dict, map_location)
    if checkpoint.get("format") != FORMAT:
        hint = " (an authors' file? use load_authors_checkpoint)" if "format" not in checkpoint else ""
        raise ValueError(f"not a {FORMAT} checkpoint: format is {checkpoint.get('format')!r}{hint}")
    heads = build_heads(checkpoint["variant"], checkpoint["dim"], **checkpoint["options"])
    head = [k for k in heads.state_dict() if k.startswith("open_set.") and k not in checkpoint["model"]]
    if head:
        raise ValueError(
            f"the checkpoint records open_set {heads.open_set_method!r} but holds no weights of its head ({head[0]})"
        )
    heads.load_state_dict(checkpoint["model"])
    heads.to(next(iter(checkpoint["model"].values())).device)
    heads.eval()
    return heads, checkpoint
