"""Using a trained model without Ray: load a checkpoint, evaluate it, draw its predictions.

A checkpoint is either a dssn checkpoint directory (student and teacher, with the config they
were trained with) or a ``.pth`` file of the DSSN/UniMatch reference code (``{'model':
state_dict}`` with DDP ``module.`` prefixes; a config must then be given for the architecture).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from dssn.config import Config, ConfigError, load_config
from dssn.data.format import ShardError, default_palette, read_dataset_info
from dssn.model import build_model, load_reference_checkpoint
from dssn.train import checkpoint as ckpt
from dssn.train.evaluate import normalize, segment

# keys under which reference-style checkpoints may hold the EMA teacher besides 'model'
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
OVERLAY_ALPHA = 0.5  # weight of the mask colour in an overlay
PROGRESS_S = 10.0  # seconds between progress lines of eval / predict


@dataclass
class Loaded:
    """Models ready for inference, with the config that describes them."""

    cfg: Config
    models: dict[str, nn.Module]  # "student" / "teacher" (reference files: what they hold)
    dataset: dict[str, Any] | None  # classes and palette, when known
    source: str


def load_for_inference(
    path: str | Path, config: str | Path | None = None, overrides: list[str] | None = None
) -> Loaded:
    """Models of a checkpoint directory (or a run directory: its last checkpoint) or reference
    ``.pth`` file, in eval mode, on CPU.

    config/overrides: for a checkpoint directory they change the stored config (e.g. data
    paths); for a reference file they are required to know the architecture.
    """
    path = ckpt.resolve_checkpoint(path)  # a run directory: its last checkpoint
    if path.is_dir():
        return _load_dir(path, config, overrides)
    if path.is_file():
        return _load_reference(path, config, overrides)
    raise ckpt.CheckpointError(f"checkpoint not found: {path}")


def _load_dir(path: Path, config, overrides) -> Loaded:
    state = ckpt.read_state(path)
    if config is not None:  # the user names the architecture; the checkpoint must fit it
        cfg = load_config(config, overrides)
    else:
        cfg = ckpt.read_config(path)
        if overrides:
            from dssn.config import apply_overrides, from_dict

            cfg = from_dict(apply_overrides(cfg.to_dict(), overrides), f"{path} + overrides")
    models = {}
    for name, file in (("student", ckpt.MODEL), ("teacher", ckpt.TEACHER)):
        if (path / file).is_file():
            model = build_model(cfg.model)
            ckpt.load_model_weights(model, path, file, model_cfg=cfg)
            models[name] = model.eval()
    return Loaded(cfg, models, state.get("dataset"), str(path))


def _load_reference(path: Path, config, overrides) -> Loaded:
    if config is None:
        raise ConfigError(
            f"{path} is a reference checkpoint without a config: pass --config (and key=value "
            "overrides) describing its architecture, e.g. configs/voc_r101.yaml"
        )
    cfg = load_config(config, overrides)
    raw = ckpt.load_file(path)
    models = {"student": _reference_model(cfg, raw, ckpt.REFERENCE_STUDENT_KEY)}
    if isinstance(raw, dict):
        teacher_key = next((k for k in ckpt.REFERENCE_TEACHER_KEYS if k in raw), None)
        if teacher_key is not None:
            models["teacher"] = _reference_model(cfg, raw, teacher_key)
    return Loaded(cfg, models, None, str(path))


def _reference_model(cfg: Config, raw: Any, key: str) -> nn.Module:
    model = build_model(cfg.model)
    load_reference_checkpoint(model, raw, key=key)  # WeightsError naming the keys that differ
    return model.eval()


def dataset_info(loaded: Loaded) -> dict[str, Any] | None:
    """Classes and palette: saved in the checkpoint, else the config's dataset.json."""
    if loaded.dataset:
        return loaded.dataset
    try:
        return read_dataset_info(loaded.cfg.data.root)
    except ShardError:
        return None


def palette_for(num_classes: int, info: dict[str, Any] | None) -> np.ndarray:
    """(num_classes, 3) uint8 colours from dataset.json, else the VOC colour map."""
    colours = (info or {}).get("palette") or []
    if len(colours) < num_classes:
        colours = default_palette(num_classes)
    return np.asarray(colours[:num_classes], dtype=np.uint8)


def colorize(pred: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colours."""
    return palette[pred]


def overlay(image: np.ndarray, colours: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Blend mask colours (H, W, 3) over the image (H, W, 3)."""
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
    return blended.round().clip(0, 255).astype(np.uint8)


def list_images(directory: str | Path) -> list[Path]:
    """Image files (png, jpg, bmp) under ``directory``, its subfolders included, sorted; or
    ``directory`` itself when it is one such file."""
    directory = Path(directory)
    if directory.is_file() and directory.suffix.lower() in IMAGE_SUFFIXES:
        return [directory]
    if not directory.is_dir():
        raise FileNotFoundError(f"not an image folder or image file: {directory}")
    images = sorted(
        p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {directory}")
    return images


@torch.no_grad()
def predict_image(model: nn.Module, image: np.ndarray, cfg: Config, mode: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) class ids (``original`` or ``sliding_window`` mode)."""
    if mode == "center_crop":
        raise ValueError("predict draws whole images: use mode original or sliding_window")
    device = next(model.parameters()).device
    x = normalize(torch.from_numpy(image).permute(2, 0, 1).contiguous(), cfg, device)
    crop = cfg.data.eval_crop or cfg.data.crop_size
    pred, _ = segment(
        model, x, mode, crop, cfg.data.eval_stride, scales=cfg.data.eval_scales,
        flip=cfg.data.eval_flip,
    )  # fmt: skip
    return pred[0].cpu().numpy().astype(np.int64)


def output_stems(images: list[Path], root: Path | None = None) -> dict[Path, str]:
    """The name each image's outputs start with: its path under ``root`` (its folder when
    None) without the suffix, or with it where two images share that stem (``a.jpg`` and
    ``a.png`` -> ``a.jpg_mask.png``, ``a.png_mask.png``). Subfolders stay subfolders."""
    rel = {p: p.relative_to(root) if root is not None else Path(p.name) for p in images}
    counts = Counter(r.with_suffix("") for r in rel.values())
    return {
        p: (r.with_suffix("") if counts[r.with_suffix("")] == 1 else r).as_posix()
        for p, r in rel.items()
    }


@dataclass
class Predicted:
    """What :func:`predict_folder` wrote, and the images it could not read (path, reason)."""

    written: list[Path]
    skipped: list[tuple[Path, str]]


def with_progress(
    items: Iterable[Any], total: int, label: str, every_s: float | None = PROGRESS_S
) -> Iterator[Any]:
    """``items``, with a line every ``every_s`` seconds (None: silent) as they are used:
    ``<label>: i/total images, <rate>/s, <n>s left``."""
    start = last = time.monotonic()
    for index, item in enumerate(items):
        now = time.monotonic()
        if every_s is not None and 0 < index < total and now - last >= every_s:
            rate = index / max(now - start, 1e-9)
            print(f"{label}: {index}/{total} images, {rate:.1f}/s, "
                  f"{(total - index) / rate:.0f}s left", flush=True)  # fmt: skip
            last = now
        yield item


def predict_folder(
    model: nn.Module,
    images: list[Path],
    out_dir: str | Path,
    cfg: Config,
    palette: np.ndarray,
    mode: str = "original",
    progress_s: float | None = PROGRESS_S,
    root: str | Path | None = None,
) -> Predicted:
    """Write ``<stem>_mask.png`` (colours) and ``<stem>_overlay.png`` for every image
    (:func:`output_stems`, under ``root``'s layout). An image that does not decode is skipped, named on the console
    and returned in ``skipped``; the others are still drawn. Progress: :func:`with_progress`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stems = output_stems(images, Path(root) if root is not None else None)
    done = Predicted([], [])
    for path in with_progress(images, len(images), "predict", progress_s):
        try:
            with Image.open(path) as im:
                image = np.array(im.convert("RGB"))  # a writable copy for torch
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            done.skipped.append((path, f"{type(e).__name__}: {e}"))
            print(f"dssn predict: skipped {path}: not a readable image ({e})", flush=True)
            continue
        colours = colorize(predict_image(model, image, cfg, mode), palette)
        for suffix, array in (("mask", colours), ("overlay", overlay(image, colours))):
            target = out_dir / f"{stems[path]}_{suffix}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array, "RGB").save(target)
            done.written.append(target)
    return done
