"""Two real gloo processes on CPU: synchronised BatchNorm, the all-reduced confusion matrix and
the all-reduced log window of the training metrics."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dssn.train.meter import MetricMeter
from dssn.train.metrics import all_reduce_confusion, confusion_matrix
from dssn.train.sync_bn import AllReduceBatchNorm, convert_sync_batchnorm

WORLD = 2


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=gen) * 3 + 1  # global batch of 4, 2 per worker
    grad_out = torch.randn(4, 3, 5, 5, generator=gen)
    return x, grad_out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        x, grad_out = _data()
        net = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), torch.device("cpu"))
        assert isinstance(net[0], AllReduceBatchNorm)
        with torch.no_grad():
            net[0].weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        part = x[rank * 2 : rank * 2 + 2].clone().requires_grad_(True)
        y = net(part)
        y.backward(grad_out[rank * 2 : rank * 2 + 2])
        # the weight gradient is a sum over this worker's pixels; DDP would sum/average it
        wgrad = net[0].weight.grad.clone()
        dist.all_reduce(wgrad)
        # confusion matrices: each worker holds half the pixels
        target = torch.tensor([[0, 1], [1, 1]])[rank]
        pred = torch.tensor([[0, 0], [1, 1]])[rank]
        cm = all_reduce_confusion(confusion_matrix(pred, target, 2))
        torch.save(
            {"y": y.detach(), "xgrad": part.grad, "wgrad": wgrad, "cm": cm,
             "running_mean": net[0].running_mean, "running_var": net[0].running_var},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_all_reduce_batchnorm_equals_batchnorm_on_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    x, grad_out = _data()
    ref = nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
    xr = x.clone().requires_grad_(True)
    y = ref(xr)
    y.backward(grad_out)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        rows = slice(rank * 2, rank * 2 + 2)
        torch.testing.assert_close(got["y"], y[rows].detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["xgrad"], xr.grad[rows], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["wgrad"], ref.weight.grad, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(got["running_mean"], ref.running_mean)
        torch.testing.assert_close(got["running_var"], ref.running_var)
        # pixels (target, pred): (0,0) (1,0) | (1,1) (1,1)
        assert got["cm"].tolist() == [[1, 0], [1, 2]]


def test_all_reduce_batchnorm_without_process_group_is_plain_batchnorm():
    x, _ = _data()
    ref, bn = nn.BatchNorm2d(3), AllReduceBatchNorm(3)
    torch.testing.assert_close(bn(x), ref(x))
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert set(bn.state_dict()) == set(ref.state_dict())


def _train_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Two DSSN steps under DDP with synchronised BatchNorm on both networks."""
    from test_train_loop import fake_batches, tiny_cfg, to_device

    from dssn.train import loop
    from dssn.train.faults import FaultInjector
    from dssn.train.setup import build_networks
    from dssn.train.state import TrainState

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        cfg = tiny_cfg(iters_per_epoch=2)
        loop.iter_train_batches = lambda cfg, epoch: fake_batches(cfg, epoch * WORLD + rank)
        loop.to_device = to_device
        nets = build_networks(cfg, torch.device("cpu"), WORLD)
        n_sync = sum(isinstance(m, AllReduceBatchNorm) for m in nets.teacher.modules())
        state = TrainState()
        faults = FaultInjector(cfg, rank, WORLD)
        out = loop.train_one_epoch(cfg, nets, state, 0, 4, faults, torch.device("cpu"), rank, WORLD)
        torch.save(
            {"student": nets.module.state_dict(), "teacher": nets.teacher.state_dict(),
             "loss": out["loss"], "n_sync": n_sync},
            os.path.join(out_dir, f"train{rank}.pt"),
        )  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_ddp_training_keeps_workers_identical(tmp_path):
    mp.spawn(_train_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    a, b = (torch.load(tmp_path / f"train{r}.pt", weights_only=True) for r in range(WORLD))
    assert a["n_sync"] > 0  # the teacher's BatchNorm layers are synchronised too
    assert a["loss"] == b["loss"]  # the epoch mean is all-reduced
    for net in ("student", "teacher"):
        for key, value in a[net].items():
            # different data on each worker, yet the same weights and (synchronised) BN stats
            torch.testing.assert_close(value, b[net][key], msg=f"{net}.{key}")


def _accumulate_cfg(accumulate: int):
    from test_train_loop import tiny_cfg

    cfg = tiny_cfg(iters_per_epoch=1, accumulate=accumulate, sync_bn=False)
    cfg.model.dropout = 0.0  # a deterministic step
    return cfg


def _micro_batches(rank: int) -> list:
    from test_train_loop import fake_batches, tiny_cfg

    return list(fake_batches(tiny_cfg(iters_per_epoch=2), rank))


def _accumulate_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One step of 2 micro-batches a worker under DDP (the first under ``no_sync``)."""
    from test_train_loop import to_device

    from dssn.train import loop
    from dssn.train.faults import FaultInjector
    from dssn.train.setup import build_networks
    from dssn.train.state import TrainState

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        cfg = _accumulate_cfg(2)
        loop.to_device = to_device
        nets = build_networks(cfg, torch.device("cpu"), WORLD)
        cpu, faults = torch.device("cpu"), FaultInjector(cfg, rank, WORLD)
        batches = _micro_batches(rank)
        loop.train_one_epoch(
            cfg, nets, TrainState(), 0, 2, faults, cpu, rank, WORLD, batches=batches
        )
        torch.save(nets.module.state_dict(), os.path.join(out_dir, f"acc{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_accumulation_across_workers_is_one_step_of_the_global_batch(tmp_path, monkeypatch):
    """2 workers x 2 accumulated micro-batches (BatchNorm per micro-batch, as without
    SyncBatchNorm) make the step one process makes accumulating all 4 micro-batches."""
    from test_train_loop import to_device

    from dssn.train import loop
    from dssn.train.faults import FaultInjector
    from dssn.train.setup import build_networks
    from dssn.train.state import TrainState

    mp.spawn(
        _accumulate_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True
    )
    monkeypatch.setattr(loop, "to_device", to_device)
    cfg, cpu = _accumulate_cfg(4), torch.device("cpu")
    nets = build_networks(cfg, cpu, world_size=1)
    batches = _micro_batches(0) + _micro_batches(1)
    loop.train_one_epoch(
        cfg, nets, TrainState(), 0, 2, FaultInjector(cfg, 0, 1), cpu, 0, 1, batches=batches
    )
    one = nets.module.state_dict()
    initial = build_networks(cfg, cpu, world_size=1).module.state_dict()
    moved = 0
    for rank in range(WORLD):
        ddp = torch.load(tmp_path / f"acc{rank}.pt", weights_only=True)
        for key, value in one.items():
            if value.is_floating_point() and "running" not in key:
                torch.testing.assert_close(ddp[key], value, rtol=1e-4, atol=1e-6, msg=key)
                moved += not torch.equal(value, initial[key])
    assert moved > 20


def _window_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        meter = MetricMeter(torch.device("cpu"))
        steps = (
            [(1.0, [1.0, 0.0, 2.0]), (3.0, [0.0, 1.0, 0.0])] if rank == 0 else [(5.0, [4.0] * 3)]
        )
        for loss, kept in steps:
            metrics = {"mask_ratio": torch.tensor(loss / 10), "kept": torch.tensor(kept)}
            meter.add(metrics, torch.tensor(loss), images=8)
        torch.save(meter.window(WORLD), os.path.join(out_dir, f"window{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_log_window_describes_every_worker(tmp_path):
    """A log line's figures are the global batch's: scalar means over all workers' steps (3
    here: 2 on rank 0, 1 on rank 1), per-class counts summed, images summed, on every rank."""
    mp.spawn(_window_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        means, counts, images = torch.load(tmp_path / f"window{rank}.pt", weights_only=True)
        assert set(means) == {"loss", "mask_ratio"} and abs(means["mask_ratio"] - 0.3) < 1e-6
        assert means["loss"] == 3.0 and counts == {"kept": [5.0, 5.0, 6.0]} and images == 24
