"""Building one worker's networks: student (DDP when distributed), EMA teacher, optimizer.

Order matters: the student is built with the same seed on every worker (or loaded from
``model.init``), its BatchNorm layers are
synchronised (both networks, when there is more than one worker and ``train.sync_bn``), it is
wrapped in DDP (which also broadcasts rank 0's weights), and only then is the teacher copied
from it, so the teacher starts identical everywhere. The teacher stays outside DDP.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dssn.config import Config, ModelConfig
from dssn.method import EMATeacher
from dssn.model import build_model
from dssn.train.checkpoint import load_init_weights
from dssn.train.evaluate import amp_enabled
from dssn.train.schedule import build_optimizer
from dssn.train.sync_bn import convert_sync_batchnorm


@dataclass
class Networks:
    """What one worker trains."""

    student: nn.Module  # what the step calls: DDP-wrapped when there are several workers
    module: nn.Module  # the student network itself (for the optimizer, EMA, eval, saving)
    ema: EMATeacher  # ema.teacher: the EMA network, in train mode like the reference
    optimizer: torch.optim.Optimizer
    # loss scaling for float16 autocast (train.amp=fp16 on CUDA); a disabled one passes the
    # loss and the optimizer step through unchanged
    scaler: torch.amp.GradScaler = field(
        default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False)
    )

    @property
    def teacher(self) -> nn.Module:
        return self.ema.teacher


def worker_threads(cfg: Config) -> int:
    """torch threads per worker: ``train.threads_per_worker`` or the worker's CPU share."""
    if cfg.train.threads_per_worker is not None:
        return max(1, cfg.train.threads_per_worker)
    return max(1, int(cfg.train.cpus_per_worker))


def init_architecture(cfg: Config) -> ModelConfig:
    """``cfg.model``, without its pretrained backbone when ``model.init`` replaces every
    weight anyway (no backbone file read, no "imagenet" download, for nothing)."""
    return replace(cfg.model, pretrained=None) if cfg.model.init else cfg.model


def build_networks(cfg: Config, device: torch.device, world_size: int) -> Networks:
    """Student, teacher and optimizer for one worker (see the module docstring for order)."""
    torch.manual_seed(cfg.train.seed)  # same initial weights on every worker
    module = build_model(init_architecture(cfg))
    if cfg.model.init:  # a trained network's weights (every worker reads the same file)
        load_init_weights(module, cfg)
    if world_size > 1 and cfg.train.sync_bn:
        module = convert_sync_batchnorm(module, device)
    module = module.to(device)
    if cfg.train.channels_last:
        module = module.to(memory_format=torch.channels_last)
    student: nn.Module = module
    if world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        # broadcast_buffers=False as the reference: BN buffers are per worker (or synchronised
        # by SyncBatchNorm); the step calls the student twice before one backward.
        student = DistributedDataParallel(
            module, device_ids=ids, output_device=ids[0] if ids else None, broadcast_buffers=False
        )
    ema = EMATeacher(module, momentum=cfg.dssn.ema, fused=cfg.dssn.fused_ema)
    optimizer = build_optimizer(module, cfg.optim)
    fp16 = cfg.train.amp == "fp16" and amp_enabled(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    return Networks(student=student, module=module, ema=ema, optimizer=optimizer, scaler=scaler)
