"""The EMA teacher on a tiny conv + BatchNorm model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dssn.method import EMATeacher

K = 0.9  # a momentum far from 1, so one update moves the teacher visibly


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def train_a_little(model: nn.Module, seed: int) -> None:
    """Change weights and BN buffers (one SGD step and one train-mode forward)."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.randn(2, 3, 6, 6)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_teacher_is_a_frozen_training_mode_copy():
    student = tiny_model()
    ema = EMATeacher(nn.DataParallel(student), momentum=K)  # wrapper is unwrapped
    assert ema.teacher is not student and isinstance(ema.teacher, nn.Sequential)
    assert ema.teacher.training
    assert all(not p.requires_grad for p in ema.teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())  # the student is untouched
    for (name, t), s in zip(
        ema.teacher.state_dict().items(), student.state_dict().values(), strict=True
    ):
        assert torch.equal(t, s), name
        assert t.data_ptr() != s.data_ptr(), name


@pytest.mark.parametrize("fused", [True, False])
def test_first_update_copies_then_k_t_plus_one_minus_k_s(fused):
    student = tiny_model()
    ema = EMATeacher(student, momentum=K, fused=fused)
    train_a_little(ema.teacher.requires_grad_(True), seed=1)  # make the teacher differ
    ema.teacher.requires_grad_(False)
    train_a_little(student, seed=2)
    assert not torch.equal(ema.teacher[1].running_mean, student[1].running_mean)

    assert ema.rate() == 0.0
    ema.update(student)  # k = 0: teacher := student, every entry
    for (name, t), s in zip(
        ema.teacher.state_dict().items(), student.state_dict().values(), strict=True
    ):
        assert torch.equal(t, s), name

    before = snapshot(ema.teacher)
    train_a_little(student, seed=3)
    assert ema.rate() == K
    ema.update(student)
    after, now = snapshot(ema.teacher), snapshot(student)
    for name in ("0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        expected = K * before[name] + (1 - K) * now[name]
        torch.testing.assert_close(after[name], expected, rtol=1e-6, atol=1e-7, msg=name)
        assert not torch.equal(after[name], before[name]), f"{name} did not move"
    # the integer counter follows the same formula, truncated back to int64
    count = after["1.num_batches_tracked"]
    assert count.dtype == torch.int64
    expected = int(
        K * before["1.num_batches_tracked"].item() + (1 - K) * now["1.num_batches_tracked"].item()
    )
    assert count.item() == expected
    assert ema.teacher.training


def test_fused_matches_reference_over_many_updates():
    student = tiny_model()
    fused, reference = EMATeacher(student, K, fused=True), EMATeacher(student, K, fused=False)
    for seed in range(6):
        train_a_little(student, seed)
        fused.update(student)
        reference.update(student)
    f, r = fused.teacher.state_dict(), reference.teacher.state_dict()
    for name in f:
        if f[name].is_floating_point():
            torch.testing.assert_close(f[name], r[name], rtol=1e-6, atol=1e-7, msg=name)
        else:
            assert torch.equal(f[name], r[name]), name


def test_state_dict_round_trip_keeps_the_update_count():
    student = tiny_model()
    ema = EMATeacher(student, K)
    ema.update(student)
    train_a_little(student, seed=4)
    ema.update(student)
    state = ema.state_dict()
    assert state["updates"] == 2

    restored = EMATeacher(tiny_model(), K)
    restored.load_state_dict(state)
    assert restored.updates == 2 and restored.rate() == K  # no k = 0 copy after a resume
    for name, value in ema.teacher.state_dict().items():
        assert torch.equal(restored.teacher.state_dict()[name], value), name

    count_only = EMATeacher(tiny_model(), K)
    count_only.load_state_dict({"updates": 5})
    assert count_only.updates == 5


def test_invalid_momentum_is_an_error():
    with pytest.raises(ValueError, match="dssn.ema"):
        EMATeacher(tiny_model(), momentum=1.0)
