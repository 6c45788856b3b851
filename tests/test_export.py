"""``dssn export``: a checkpoint's network as a torch.export program (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import torch

from dssn.cli import main
from dssn.config import Config
from dssn.model import build_model
from dssn.train.evaluate import normalize
from dssn.train.inference import predict_image


def reference_checkpoint(tmp_path):
    """A DSSN/UniMatch-style ``best.pth`` ({'model': DDP state dict}) and its config."""
    cfg = Config()
    cfg.model.backbone, cfg.model.width, cfg.model.num_classes = "tiny", 8, 3
    cfg.data.crop_size = 32
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    for module in model.modules():  # BatchNorm statistics that are not the identity
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "best.pth"
    torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    cfg.save(tmp_path / "config.yaml")
    return path, tmp_path / "config.yaml", model, cfg


def export_student(tmp_path, name: str, capsys):
    """``dssn export`` of the reference checkpoint's student to ``deploy/<name>``: (the file,
    the network, its config), checked to be the only file written."""
    path, config, model, cfg = reference_checkpoint(tmp_path)
    out = tmp_path / "deploy" / name
    args = ["export", "--checkpoint", str(path), "--config", str(config), "--out", str(out)]
    assert main([*args, "--model", "student"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == [name]  # no partial file left
    return out, model, cfg


def test_the_program_predicts_as_dssn_predict_at_any_size_and_batch(tmp_path, capsys):
    out, model, cfg = export_student(tmp_path, "student.pt2", capsys)
    extra = {"dssn.json": ""}
    program = torch.export.load(out, extra_files=extra).module()
    info = json.loads(extra["dssn.json"])
    assert info["model"] == "student" and info["classes"] == ["0", "1", "2"]
    assert info["config"]["model"]["backbone"] == "tiny" and len(info["palette"]) == 3
    predicts_as_dssn_predict(lambda images: program(images).detach(), model, cfg, 1e-5)


def predicts_as_dssn_predict(run, model, cfg, tolerance: float) -> None:
    """``run`` (uint8 images (B, 3, H, W) -> logits) at sizes and a batch other than the traced
    2 x 32 x 32: its labels are ``dssn predict``'s, its logits the network's after the
    evaluation's normalisation (to ``tolerance``)."""
    gen = torch.Generator().manual_seed(1)
    for batch, height, width in ((1, 32, 32), (3, 45, 61)):
        images = torch.randint(0, 256, (batch, 3, height, width), generator=gen, dtype=torch.uint8)
        logits = torch.as_tensor(run(images))
        assert logits.shape == (batch, 3, height, width)
        for image, these in zip(images, logits, strict=True):
            expected = predict_image(model, image.permute(1, 2, 0).numpy(), cfg, "original")
            assert np.array_equal(these.argmax(0).numpy(), expected)
            with torch.no_grad():
                direct = model(normalize(image, cfg, torch.device("cpu")))[0]
            torch.testing.assert_close(these, direct, rtol=tolerance, atol=tolerance)


def test_what_the_checkpoint_lacks_and_a_wrong_name_are_one_line_errors(tmp_path, capsys):
    path, config, _, _ = reference_checkpoint(tmp_path)
    args = ["export", "--checkpoint", str(path), "--config", str(config)]
    assert main([*args, "--out", str(tmp_path / "t.pt2")]) == 2  # --model teacher: not in it
    assert "holds no teacher (it holds: student)" in capsys.readouterr().err
    assert main([*args, "--model", "student", "--out", str(tmp_path / "t.pth")]) == 2
    assert "name the file *.pt2 (a torch.export program) or *.onnx" in capsys.readouterr().err
    assert not (tmp_path / "t.pt2").exists() and not (tmp_path / "t.pth").exists()


def test_the_onnx_model_predicts_as_dssn_predict_at_any_size_and_batch(tmp_path, capsys):
    import onnxruntime

    out, model, cfg = export_student(tmp_path, "student.onnx", capsys)
    session = onnxruntime.InferenceSession(str(out))
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    info = json.loads(session.get_modelmeta().custom_metadata_map["dssn.json"])
    assert info["model"] == "student" and info["classes"] == ["0", "1", "2"]
    assert info["format"].startswith("dssn ONNX model: uint8 RGB")
    predicts_as_dssn_predict(
        lambda images: session.run(None, {"images": images.numpy()})[0], model, cfg, 1e-4
    )


def test_onnx_without_its_packages_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    import sys

    path, config, _, _ = reference_checkpoint(tmp_path)
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    args = ["export", "--checkpoint", str(path), "--config", str(config), "--model", "student"]
    assert main([*args, "--out", str(tmp_path / "s.onnx")]) == 2
    err = capsys.readouterr().err
    assert "needs the onnx and onnxscript packages (onnxscript is missing)" in err
    assert "pip install 'dssn[onnx]'" in err and not (tmp_path / "s.onnx").exists()
