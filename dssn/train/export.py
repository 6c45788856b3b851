"""``dssn export``: a checkpoint's teacher (or student) as one self-contained file.

    dssn export --checkpoint DIR|FILE.pth --out teacher.pt2 [--model teacher|student]
    dssn export --checkpoint DIR|FILE.pth --out teacher.onnx      # needs dssn[onnx]

The file is a ``torch.export`` program (``.pt2``): the network with its input normalisation,
from uint8 RGB images (B, 3, H, W) to logits (B, C, H, W) at the input's size, any batch size
and image size. Loading it needs torch only, not this package or the model's code:

    extra = {"dssn.json": ""}
    model = torch.export.load("teacher.pt2", extra_files=extra).module()
    labels = model(images).argmax(1)          # images: uint8 (B, 3, H, W), RGB
    info = json.loads(extra["dssn.json"])     # classes, palette, config, source checkpoint

It predicts as ``dssn predict --mode original`` (one pass over the whole image); a sliding
window is the caller's loop.

``.onnx``: the same program through torch's ONNX exporter (``onnx`` and ``onnxscript``, the
``[onnx]`` extra), with the same input, output and dynamic sizes, for onnxruntime, TensorRT and
the like. The same JSON is the model's metadata property ``dssn.json``:

    session = onnxruntime.InferenceSession("teacher.onnx")
    logits = session.run(None, {"images": images_uint8})[0]
    info = json.loads(session.get_modelmeta().custom_metadata_map["dssn.json"])
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dssn.config import ConfigError

INFO_FILE = "dssn.json"  # the extra file inside the .pt2 with classes, palette and config
EXAMPLE_BATCH = 2  # the traced example's batch (1 would make the program batch-1 only)


class Deployed(nn.Module):
    """uint8 RGB (B, 3, H, W) -> logits (B, C, H, W): the evaluation's normalisation (as
    :func:`dssn.train.evaluate.normalize`), then the network."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float().div(255.0) - self.mean) / self.std
        return self.model(x)


def export_program(model: nn.Module, cfg: Any, size: int | None = None):
    """The ``torch.export`` program of ``model`` wrapped in :class:`Deployed`, dynamic in the
    batch, the height and the width. Traced on a ``size``-px example (default: the crop)."""
    deployed = Deployed(model, cfg.data.mean, cfg.data.std).eval()
    side = size or cfg.data.crop_size
    example = torch.zeros(EXAMPLE_BATCH, 3, side, side, dtype=torch.uint8)
    dynamic = {"images": {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO,
                          3: torch.export.Dim.AUTO}}  # fmt: skip
    with torch.no_grad():
        return torch.export.export(deployed, (example,), dynamic_shapes=dynamic)


def export_command(args) -> int:
    from dssn.train.inference import dataset_info, load_for_inference, palette_for

    out = Path(args.out)
    if out.suffix not in FORMATS:  # before the checkpoint is read
        raise ConfigError(
            f"--out {out}: name the file *.pt2 (a torch.export program) or *.onnx (ONNX)"
        )
    if out.suffix == ".onnx":
        onnx_modules()  # a missing extra: one line, before the checkpoint is read
    loaded = load_for_inference(args.checkpoint, args.config, args.overrides)
    if args.model not in loaded.models:
        raise ConfigError(
            f"{loaded.source} holds no {args.model} (it holds: {', '.join(loaded.models)})"
        )
    cfg = loaded.cfg
    print(f"dssn export: tracing the {args.model} of {loaded.source} ...", flush=True)
    program = export_program(loaded.models[args.model], cfg, args.size)
    info = dataset_info(loaded) or {}
    names = info.get("classes") or [str(i) for i in range(cfg.model.num_classes)]
    meta = {
        "format": "dssn torch.export program: uint8 RGB (B, 3, H, W) -> logits (B, C, H, W)",
        "model": args.model,
        "source": loaded.source,
        "classes": names,
        "palette": palette_for(cfg.model.num_classes, info).tolist(),
        "ignore_index": info.get("ignore_index", 255),
        "torch": torch.__version__,
        "config": cfg.to_dict(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.stem + ".partial" + out.suffix)  # a half-written file never passes
    if out.suffix == ".pt2":
        torch.export.save(program, partial, extra_files={INFO_FILE: json.dumps(meta)})
        load = f'torch.export.load("{out}").module()(images_uint8)'
    else:
        meta["format"] = meta["format"].replace("torch.export program", "ONNX model")
        save_onnx(program, meta, partial)
        load = f'onnxruntime.InferenceSession("{out}").run(None, {{"images": images_uint8}})'
    partial.replace(out)
    size_mb = out.stat().st_size / 2**20
    print(f"wrote {out} ({size_mb:.1f} MiB): {cfg.model.backbone}, {len(names)} classes")
    print(f"load it: {load}  # -> logits")
    return 0


FORMATS = (".pt2", ".onnx")


def onnx_modules():
    """(onnx, onnxscript), or a ConfigError naming the extra that installs them."""
    try:
        import onnx
        import onnxscript
    except ImportError as e:
        raise ConfigError(
            f"dssn export to .onnx needs the onnx and onnxscript packages ({e.name} is "
            "missing): pip install 'dssn[onnx]'"
        ) from e
    return onnx, onnxscript


def save_onnx(program, meta: dict[str, Any], path: Path) -> None:
    """``program`` (:func:`export_program`) as an ONNX model at ``path``, its input and output
    named ``images`` and ``logits``, ``meta`` as the metadata property ``dssn.json``."""
    import logging

    onnx, _ = onnx_modules()
    logging.getLogger("torch.onnx").setLevel(logging.WARNING)  # its progress lines
    exported = torch.onnx.export(
        program, dynamo=True, input_names=["images"], output_names=["logits"], verbose=False
    )
    model = exported.model_proto
    onnx.helper.set_model_props(model, {INFO_FILE: json.dumps(meta)})
    onnx.save(model, str(path))
