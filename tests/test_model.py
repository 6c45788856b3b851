"""DeepLabV3+ and backbones: parameter counts, shapes, the feature-perturbation contract, and
weight loading (reference deep-stem files, torchvision files, reference checkpoints, offline)."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from dssn.config import ModelConfig
from dssn.model import SPECS, WeightsError, build_backbone, build_model, load_reference_checkpoint

CLASSES = 5
BATCH = 2
SIZE = 64


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(backbone="tiny", width=16, num_classes=CLASSES)
    return ModelConfig(**{**base, **kw})


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- architecture


@pytest.mark.parametrize(
    "backbone, expected", [("resnet101_deep", 59_468_085), ("resnet50_deep", 40_475_957)]
)
def test_reference_parameter_counts(backbone, expected):
    model = build_model(ModelConfig(backbone=backbone, num_classes=21))
    assert n_params(model) == expected


def test_head_widths_match_reference_for_2048_channels():
    model = build_model(ModelConfig(backbone="resnet50", num_classes=21))
    assert model.head.b0[0].in_channels == 2048
    assert model.head.project[0].in_channels == 5 * 256
    assert model.head.project[0].out_channels == 256
    assert model.reduce[0].out_channels == 48
    assert model.fuse[0].in_channels == 256 + 48
    assert [model.head.b1[0].dilation[0], model.head.b2[0].dilation[0]] == [6, 12]
    assert model.head.b3[0].dilation[0] == 18


def test_head_key_names_match_reference():
    # the reference DeepLabV3Plus names: a reference checkpoint is a plain ``module.`` strip away
    keys = set(build_model(tiny_cfg()).state_dict())
    reference = ["head.b0.0.weight", "head.b3.1.running_var", "head.b4.gap.1.weight"]
    reference += ["head.project.0.weight", "reduce.0.weight", "fuse.0.weight", "fuse.4.bias"]
    reference += ["classifier.weight", "classifier.bias", "backbone.layer4.0.conv1.weight"]
    assert set(reference) <= keys


def test_tiny_model_stays_tiny():
    model = build_model(tiny_cfg())
    assert n_params(model) < 500_000
    assert model.head.project[0].out_channels == 16  # c4 = 128 channels -> 128 // 8


def _effective_stride(backbone) -> tuple[int, int]:
    """(output stride, dilation of the last 3x3 conv) read from the modules."""
    stride = 4  # stem conv (2) + max-pool (2)
    for layer in (backbone.layer2, backbone.layer3, backbone.layer4):
        stride *= max(m.stride[0] for m in layer[0].modules() if isinstance(m, nn.Conv2d))
    last = [m for m in backbone.layer4.modules() if isinstance(m, nn.Conv2d)]
    return stride, max(m.dilation[0] for m in last)


@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize("name", list(SPECS))
def test_backbone_output_stride(name, output_stride):
    backbone = build_backbone(name, width=16, output_stride=output_stride)
    # layer4's blocks after the first are dilated 32 / os; its first block keeps the previous
    # stage's dilation (as torchvision and the reference), which is all ``tiny`` has
    dilation = 32 // output_stride if len(backbone.layer4) > 1 else 16 // output_stride
    assert _effective_stride(backbone) == (output_stride, dilation)


@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize("name", ["tiny", "resnet18"])
def test_forward_shapes(name, output_stride):
    model = build_model(tiny_cfg(backbone=name, output_stride=output_stride))
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    c1, c4 = model.backbone(x)
    assert c1.shape == (BATCH, model.backbone.c1_channels, SIZE // 4, SIZE // 4)
    side = SIZE // output_stride
    assert c4.shape == (BATCH, model.backbone.c4_channels, side, side)
    logits = model(x)
    assert logits.shape == (BATCH, CLASSES, SIZE, SIZE)
    logits.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_non_square_input_gives_input_size():
    model = build_model(tiny_cfg())
    assert model(torch.randn(BATCH, 3, 48, 64)).shape == (BATCH, CLASSES, 48, 64)


# ----------------------------------------------------------------------------- perturbation


def test_fp_branches_train_mode_differ():
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).train()
    x = torch.randn(4, 3, SIZE, SIZE)
    clean, perturbed = model(x, fp=2, fp_start=1)
    assert clean.shape == (4, CLASSES, SIZE, SIZE)
    assert len(perturbed) == 2
    assert all(p.shape == (3, CLASSES, SIZE, SIZE) for p in perturbed)
    assert not torch.allclose(perturbed[0], perturbed[1])
    assert not torch.allclose(perturbed[0], clean[1:])
    assert not torch.allclose(perturbed[1], clean[1:])


def test_fp_branches_eval_mode_equal_clean():
    model = build_model(tiny_cfg())
    x = torch.randn(3, 3, SIZE, SIZE)
    model.train()
    model(x)  # give BN running stats something other than the initial values
    model.eval()
    assert not model.dropout_c1.training and not model.dropout_c4.training
    with torch.no_grad():
        clean, perturbed = model(x, fp=2, fp_start=1)
        plain = model(x)
    torch.testing.assert_close(clean, plain, atol=1e-5, rtol=1e-5)
    for p in perturbed:
        torch.testing.assert_close(p, clean[1:], atol=1e-5, rtol=1e-5)


def test_fp_one_decoder_call_over_all_branches():
    model = build_model(tiny_cfg())
    batches = []
    model.fuse.register_forward_hook(lambda m, inp, out: batches.append(inp[0].shape[0]))
    x = torch.randn(4, 3, SIZE, SIZE)
    model(x, fp=2, fp_start=1)
    assert batches == [4 + 2 * 3]  # one call: clean (4) + two perturbed draws of images [1:]


@pytest.mark.parametrize("fp_start", [0, 2, 3])
def test_fp_start_slicing(fp_start):
    model = build_model(tiny_cfg())
    clean, perturbed = model(torch.randn(3, 3, 32, 32), fp=2, fp_start=fp_start)
    assert clean.shape[0] == 3
    assert [p.shape[0] for p in perturbed] == [3 - fp_start] * 2


def test_fp_start_out_of_range_raises():
    model = build_model(tiny_cfg())
    with pytest.raises(ValueError, match="fp_start"):
        model(torch.randn(2, 3, 32, 32), fp=2, fp_start=3)


def test_dropout_modules_use_config():
    model = build_model(tiny_cfg(dropout=0.3))
    assert isinstance(model.dropout_c1, nn.Dropout2d) and model.dropout_c1.p == 0.3
    assert isinstance(model.dropout_c4, nn.Dropout2d) and model.dropout_c4.p == 0.3


def test_parameter_groups_partition_the_model():
    model = build_model(tiny_cfg())
    backbone = {id(p) for p in model.backbone_parameters()}
    head = {id(p) for p in model.head_parameters()}
    assert backbone and head and not backbone & head
    assert backbone | head == {id(p) for p in model.parameters()}
    assert {id(p) for p in model.classifier.parameters()} <= head


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    expected = model(x, fp=2, fp_start=1)
    model = model.to(memory_format=torch.channels_last)
    clean, perturbed = model(x.to(memory_format=torch.channels_last), fp=2, fp_start=1)
    torch.testing.assert_close(clean, expected[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(perturbed[1], expected[1][1], atol=1e-4, rtol=1e-4)
    model.train()
    clean, perturbed = model(x.to(memory_format=torch.channels_last), fp=2, fp_start=1)
    (clean.mean() + perturbed[0].mean()).backward()


# ----------------------------------------------------------------------------- weights


REFERENCE_KEYS = [
    "conv1.0.weight",
    "conv1.1.weight",
    "conv1.3.weight",
    "conv1.4.weight",
    "conv1.6.weight",
    "bn1.weight",
    "layer1.0.conv1.weight",
]


def test_deep_stem_reference_file_loads(tmp_path):
    source = build_backbone("resnet50_deep")
    state = source.state_dict()
    assert all(k in state for k in REFERENCE_KEYS)
    assert state["layer1.0.conv1.weight"].shape[1] == 128  # layer1 inplanes after the deep stem
    # the reference file also carries the ImageNet classifier, which the backbone drops
    state = {**state, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    model = build_model(ModelConfig(backbone="resnet50_deep", pretrained=str(path)))
    assert same_state(model.backbone, source)


def test_torchvision_file_loads_into_resnet18(tmp_path):
    reference = torchvision.models.resnet18()
    path = tmp_path / "tv18.pth"
    torch.save({f"module.{k}": v for k, v in reference.state_dict().items()}, path)
    model = build_model(tiny_cfg(backbone="resnet18", pretrained=str(path)))
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, reference.state_dict()[key]), key


def test_torchvision_resnet50_layout_matches():
    ours = build_backbone("resnet50").state_dict()
    theirs = {k: v for k, v in torchvision.models.resnet50().state_dict().items()}
    theirs = {k: v.shape for k, v in theirs.items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in ours.items()} == theirs


def test_backbone_file_of_other_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(build_backbone("resnet18").state_dict(), path)
    with pytest.raises(WeightsError) as err:
        build_model(ModelConfig(backbone="resnet50_deep", pretrained=str(path)))
    message = str(err.value)
    assert str(path) in message and "missing" in message and "conv1.0.weight" in message


def test_missing_backbone_file_is_named(tmp_path):
    with pytest.raises(WeightsError, match="nope.pth"):
        build_model(tiny_cfg(pretrained=str(tmp_path / "nope.pth")))


def test_reference_checkpoint_with_module_prefix_loads(tmp_path):
    source = build_model(tiny_cfg())
    checkpoint = {
        "model": {f"module.{k}": v for k, v in source.state_dict().items()},
        "optimizer": {},
        "epoch": 3,
        "previous_best": 0.5,
    }
    target = build_model(tiny_cfg())
    assert not same_state(source, target)
    load_reference_checkpoint(target, checkpoint)
    assert same_state(source, target)
    path = tmp_path / "best.pth"
    torch.save(checkpoint, path)
    again = build_model(tiny_cfg())
    load_reference_checkpoint(again, path)
    assert same_state(source, again)


def test_checkpoint_of_other_architecture_is_a_clear_error():
    other = build_model(tiny_cfg(backbone="resnet18"))
    target = build_model(tiny_cfg())
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsError, match="shape mismatches|missing|unexpected") as err:
        load_reference_checkpoint(target, {"model": other.state_dict()})
    assert "layer1.1.conv1.weight" in str(err.value)  # resnet18 has two blocks per stage
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # untouched


def test_checkpoint_without_model_key_names_the_keys():
    with pytest.raises(WeightsError, match="'model'.*epoch"):
        load_reference_checkpoint(build_model(tiny_cfg()), {"epoch": 1, "weights": {}})


def _offline(monkeypatch, tmp_path):
    """An empty TORCH_HOME, and any download attempt fails as on a machine without internet."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    return tmp_path / "hub" / "checkpoints"


def test_imagenet_offline_error_names_the_file(monkeypatch, tmp_path):
    cache = _offline(monkeypatch, tmp_path)
    with pytest.raises(WeightsError) as err:
        build_model(tiny_cfg(backbone="resnet18", pretrained="imagenet"))
    assert "resnet18-f37072fd.pth" in str(err.value) and str(cache) in str(err.value)


def test_imagenet_from_hub_cache_without_network(monkeypatch, tmp_path):
    cache = _offline(monkeypatch, tmp_path)
    cache.mkdir(parents=True)
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), cache / "resnet18-f37072fd.pth")
    model = build_model(tiny_cfg(backbone="resnet18", pretrained="imagenet"))
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)


def test_imagenet_for_deep_stem_names_the_reference_file(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    with pytest.raises(WeightsError, match=r"resnet101\.pth.*UniMatch/DSSN"):
        build_model(ModelConfig(backbone="resnet101_deep", pretrained="imagenet"))


def test_imagenet_for_tiny_is_an_error():
    with pytest.raises(WeightsError, match="tiny"):
        build_model(tiny_cfg(pretrained="imagenet"))
