"""The checkpoint format: a plain directory, readable without Ray.

    model.pt      student state dict (unwrapped: no DDP ``module.`` prefix)
    teacher.pt    EMA teacher state dict (same keys as the student)
    optimizer.pt  optimizer state dict (holds the current learning rates too)
    rng.pt        RNG states of every worker (torch, CUDA, numpy, python), list indexed by rank
    state.json    epoch, iteration, best mIoU, the resolved config, dataset classes and palette

Everything loads with ``torch.load(..., weights_only=True)``. Loading weights into a model of
another architecture raises :class:`CheckpointError` saying what the checkpoint was made for.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import dssn
from dssn.config import Config, from_dict

FORMAT_VERSION = 1
MODEL = "model.pt"
TEACHER = "teacher.pt"
OPTIMIZER = "optimizer.pt"
RNG = "rng.pt"
STATE = "state.json"
MAX_LISTED_KEYS = 5  # keys named in a mismatch error
# a DSSN / UniMatch reference checkpoint file: the student's state dict, and the EMA teacher's
# under one of these keys where the file has one
REFERENCE_STUDENT_KEY = "model"
REFERENCE_TEACHER_KEYS = ("model_ema", "ema_model", "teacher", "model_teacher")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, malformed, or does not fit the model it is loaded into."""


# ----------------------------------------------------------------------------- writing


def save_checkpoint(
    directory: str | Path,
    *,
    student: nn.Module,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    rng: list[dict[str, Any]] | None = None,
) -> Path:
    """Write a checkpoint directory. ``state`` must hold at least ``epoch``, ``iteration`` and
    ``config`` (a Config's dict); format version and package version are added here."""
    for key in ("epoch", "iteration", "config"):
        if key not in state:
            raise ValueError(f"checkpoint state needs '{key}'")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(unwrap(student).state_dict(), directory / MODEL)
    torch.save(unwrap(teacher).state_dict(), directory / TEACHER)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), directory / OPTIMIZER)
    if rng is not None:
        torch.save(rng, directory / RNG)
    full = {"format_version": FORMAT_VERSION, "dssn_version": dssn.__version__, **state}
    (directory / STATE).write_text(json.dumps(full, indent=1, allow_nan=True))
    return directory


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


# ----------------------------------------------------------------------------- reading


def is_checkpoint_dir(path: str | Path) -> bool:
    """A directory with state.json and model.pt."""
    path = Path(path)
    return (path / STATE).is_file() and (path / MODEL).is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as given, or, for a run directory (``<storage>/<name>``), its
    last complete ``checkpoint_epoch_*``; other paths unchanged (the reader names them)."""
    path = Path(path)
    if not path.is_dir() or is_checkpoint_dir(path):
        return path
    found = [c for c in path.glob("checkpoint_epoch_*") if is_checkpoint_dir(c)]
    return max(found, key=lambda c: c.name) if found else path


def read_state(directory: str | Path) -> dict[str, Any]:
    """state.json of a checkpoint directory."""
    directory = Path(directory)
    path = directory / STATE
    if not path.is_file():
        what = "no such directory" if not directory.is_dir() else f"no {STATE} in it"
        raise CheckpointError(f"{directory} is not a dssn checkpoint directory ({what})")
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {state.get('format_version')!r}, "
            f"this code reads format {FORMAT_VERSION}"
        )
    return state


def read_config(directory: str | Path) -> Config:
    """The resolved Config a checkpoint was trained with."""
    return from_dict(read_state(directory)["config"], where=f"{Path(directory) / STATE}")


def load_file(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU with a clear error if the file is absent."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strict ``load_state_dict`` that explains an architecture mismatch.

    source: what the weights came from (file path and what it was trained as), for the error.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
        ):
            if items:
                shown = ", ".join(items[:MAX_LISTED_KEYS])
                more = f", … ({len(items)} in all)" if len(items) > MAX_LISTED_KEYS else ""
                parts.append(f"{len(items)} {label} ({shown}{more})")
        raise CheckpointError(
            f"{source} does not fit this model (another architecture?): " + "; ".join(parts)
        )
    model.load_state_dict(state_dict, strict=True)


def describe_model(cfg: Config) -> str:
    """Short architecture description used in mismatch errors."""
    m = cfg.model
    return (
        f"backbone={m.backbone}, num_classes={m.num_classes}, width={m.width}, "
        f"output_stride={m.output_stride}"
    )


def load_model_weights(
    model: nn.Module, directory: str | Path, which: str = MODEL, model_cfg: Config | None = None
) -> None:
    """Load ``model.pt`` or ``teacher.pt`` of a checkpoint directory into ``model``.

    model_cfg: the config ``model`` was built from, named in the error if the checkpoint was
    made for another architecture.
    """
    directory = Path(directory)
    state = read_state(directory)
    trained = from_dict(state["config"], where=str(directory / STATE))
    source = f"{directory / which} (trained as {describe_model(trained)})"
    if model_cfg is not None:
        source += f"; the model here is {describe_model(model_cfg)}"
    load_weights(model, load_file(directory / which), source)


def load_init_weights(model: nn.Module, cfg: Config) -> str:
    """``model.init`` into ``model`` (a run's starting weights): a checkpoint directory's
    teacher (its student if it has none), a run directory's last checkpoint, or a reference
    ``.pth`` file's EMA teacher or student. Returns what was loaded, for the log.
    CheckpointError if the path holds no checkpoint or another architecture."""
    from dssn.model.weights import WeightsError, load_reference_checkpoint

    path = resolve_checkpoint(cfg.model.init)
    if path.is_dir():
        which = TEACHER if (path / TEACHER).is_file() else MODEL
        load_model_weights(model, path, which, model_cfg=cfg)
        return str(path / which)
    if not path.is_file():
        raise CheckpointError(f"model.init: checkpoint not found: {path}")
    raw = load_file(path)
    keys = raw if isinstance(raw, dict) else {}
    key = next((k for k in REFERENCE_TEACHER_KEYS if k in keys), REFERENCE_STUDENT_KEY)
    try:
        load_reference_checkpoint(model, raw, key=key)
    except WeightsError as e:
        raise CheckpointError(f"model.init: {e}; the model here is {describe_model(cfg)}") from e
    return f"{path} ('{key}')"


# ----------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (``weights_only``-loadable)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": [
            np_kind,
            torch.from_numpy(np_keys.astype(np.int64)),
            np_pos,
            np_has_gauss,
            np_gauss,
        ],
        "python": [py_version, torch.tensor(py_state, dtype=torch.int64), py_gauss],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in py_state.tolist()), py_gauss))
