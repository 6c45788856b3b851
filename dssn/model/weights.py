"""Loading weights: pretrained backbones (local file or torchvision ImageNet) and reference
DSSN/UniMatch checkpoints. Nothing here downloads unless ``pretrained: imagenet`` asks for it,
and then only when the file is not already in the torch hub cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .resnet import SPECS

STRIP_PREFIXES = ("module.", "backbone.")  # DDP wrapper; a backbone saved inside a model
CLASSIFIER_PREFIX = "fc."  # ImageNet classifier in backbone files; the backbone has no fc
IMAGENET_WEIGHTS = "IMAGENET1K_V1"  # torchvision's classic ImageNet weights for each ResNet
REFERENCE_BACKBONE_FILE = "{depth}.pth"  # the DSSN/UniMatch release's pretrained/resnet101.pth
MAX_LISTED_KEYS = 10  # keys shown in a mismatch error


class WeightsError(RuntimeError):
    """A weights file is missing, unreadable, or does not fit the model."""


def _strip_prefixes(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict:
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    more = len(keys) - MAX_LISTED_KEYS
    return shown + (f", ... ({more} more)" if more > 0 else "")


def load_exact(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``module.load_state_dict(state, strict=True)``, checked first so that a mismatch raises
    a WeightsError naming ``source`` and the missing / unexpected / wrongly shaped keys, and
    leaves ``module`` untouched."""
    expected = module.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}  # old BN files lack it
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = [f"{source} does not fit {type(module).__name__}:"]
        if missing:
            parts.append(f"  missing {len(missing)} keys: {_listed(missing)}")
        if unexpected:
            parts.append(f"  unexpected {len(unexpected)} keys: {_listed(unexpected)}")
        if shapes:
            parts.append(f"  {len(shapes)} shape mismatches (file vs model): {_listed(shapes)}")
        raise WeightsError("\n".join(parts))
    module.load_state_dict(state, strict=False)  # only optional keys can be absent here


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth`` file (``weights_only``); a ``{'state_dict': ...}`` or
    ``{'model': ...}`` wrapper is unwrapped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors: name the file
        raise WeightsError(f"cannot read weights file {path}: {e}") from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return state


def load_backbone_file(backbone: nn.Module, path: str | Path) -> None:
    """Load a backbone state dict from a local file (reference deep-stem ``resnet101.pth``, a
    torchvision ResNet state dict, or our own backbone). ``module.``/``backbone.`` prefixes are
    stripped and the ImageNet classifier (``fc.*``) dropped; everything else must match."""
    state = _strip_prefixes(read_state_dict(path), STRIP_PREFIXES)
    state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIX)}
    load_exact(backbone, state, str(path))


def imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights for backbone ``name``, from the torch hub cache, else
    downloaded; offline, a WeightsError naming the file to place and where."""
    spec = SPECS[name]
    if spec.torchvision_name is None:
        if spec.deep_stem:
            depth = name.removesuffix("_deep")
            raise WeightsError(
                f"backbone '{name}' (deep stem) has no torchvision ImageNet weights: pass the "
                f"reference file as a path, model.pretrained=/path/to/"
                f"{REFERENCE_BACKBONE_FILE.format(depth=depth)} (the pretrained "
                f"{REFERENCE_BACKBONE_FILE.format(depth=depth)} of the UniMatch/DSSN release)"
            )
        raise WeightsError(f"backbone '{name}' has no ImageNet weights; use pretrained: null")
    from torchvision.models import get_model_weights

    weights = get_model_weights(spec.torchvision_name)[IMAGENET_WEIGHTS]
    filename = weights.url.rsplit("/", 1)[-1]
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    cached = cache_dir / filename
    if cached.is_file():
        return read_state_dict(cached)
    try:
        return torch.hub.load_state_dict_from_url(
            weights.url, model_dir=str(cache_dir), progress=False, check_hash=True
        )
    except Exception as e:  # URLError, timeouts, hash errors: all mean "place it yourself"
        raise WeightsError(
            f"ImageNet weights for '{name}' are not in the torch hub cache and could not be "
            f"downloaded ({type(e).__name__}: {e}). Place {filename} (from {weights.url}) at "
            f"{cached} (directory {cache_dir}; set TORCH_HOME to move it)."
        ) from e


def load_pretrained(backbone: nn.Module, name: str, pretrained: str | None) -> None:
    """Apply ``cfg.model.pretrained`` (None | local path | "imagenet") to ``backbone``."""
    if not pretrained:
        return
    if pretrained == "imagenet":
        state = imagenet_state_dict(name)
        state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIX)}
        load_exact(backbone, state, f"torchvision {name} {IMAGENET_WEIGHTS}")
    else:
        load_backbone_file(backbone, pretrained)


def load_reference_checkpoint(
    model: nn.Module, state: dict[str, Any] | str | Path, key: str = "model"
) -> None:
    """Load a DSSN/UniMatch reference checkpoint (``{'model': state_dict}`` with ``module.``
    prefixes, as their ``best.pth``/``latest.pth``), a bare state dict, or a path to either,
    into our DeepLabV3+; a WeightsError lists the keys that do not fit."""
    source = "checkpoint"
    if isinstance(state, (str, Path)):
        source = str(state)
        try:
            state = torch.load(Path(state).expanduser(), map_location="cpu", weights_only=True)
        except FileNotFoundError as e:
            raise WeightsError(f"checkpoint not found: {source}") from e
    if not isinstance(state, dict):
        raise WeightsError(f"{source}: expected a dict, got {type(state).__name__}")
    if not all(torch.is_tensor(v) for v in state.values()):  # a wrapper, not a state dict
        if not isinstance(state.get(key), dict):
            raise WeightsError(f"{source}: no '{key}' state dict; top-level keys {list(state)}")
        state = state[key]
    load_exact(model, _strip_prefixes(state, ("module.",)), source)
