"""The EMA teacher (METHOD.md step 9).

After every optimizer step, every entry of the teacher's state dict (weights and BatchNorm
buffers) becomes ``k * teacher + (1 - k) * student``, with ``k = 0`` on the first update
(teacher := student) and ``k = ema`` afterwards. The teacher is kept out of DDP, has no
gradients, and stays in training mode like the reference's (its BatchNorm normalises with the
statistics of the batch it sees, and its running buffers then take part in the EMA).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel


def unwrap(module: nn.Module) -> nn.Module:
    """The network inside a DDP / DataParallel wrapper (or the module itself)."""
    if isinstance(module, (DistributedDataParallel, DataParallel)):
        return module.module
    return module


def _split(tensors: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    floats = [k for k, v in tensors.items() if v.is_floating_point()]
    others = [k for k, v in tensors.items() if not v.is_floating_point()]
    return floats, others


class EMATeacher:
    """An exponential moving average of a student network.

    ``fused=True`` updates the teacher's tensors in place with two multi-tensor kernels
    (``_foreach_mul_`` / ``_foreach_add_``); ``fused=False`` is the reference: a new state dict
    ``k * t + (1 - k) * s`` built entry by entry and loaded with ``load_state_dict``.
    Integer entries (BatchNorm's ``num_batches_tracked``) follow the reference in both modes:
    the same formula in floating point, truncated back to the integer type by the copy.
    """

    def __init__(self, student: nn.Module, momentum: float, fused: bool = True) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"dssn.ema must be in [0, 1), got {momentum}")
        self.teacher = copy.deepcopy(unwrap(student))
        self.teacher.requires_grad_(False)
        self.teacher.train()  # reference: the teacher is never put in eval mode
        self.momentum = momentum
        self.fused = fused
        self.updates = 0

    def rate(self) -> float:
        """The k of the next update: 0 on the first (teacher := student), then ``momentum``."""
        return 0.0 if self.updates == 0 else self.momentum

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """One EMA step towards ``student`` (DDP-wrapped or not)."""
        k = self.rate()
        student_sd = unwrap(student).state_dict()
        if self.fused:
            self._update_fused(student_sd, k)
        else:
            self._update_reference(student_sd, k)
        self.updates += 1

    def _update_reference(self, student_sd: dict[str, torch.Tensor], k: float) -> None:
        teacher_sd = self.teacher.state_dict()
        new = {key: k * teacher_sd[key] + (1 - k) * student_sd[key] for key in teacher_sd}
        self.teacher.load_state_dict(new)

    def _update_fused(self, student_sd: dict[str, torch.Tensor], k: float) -> None:
        teacher_sd = self.teacher.state_dict()  # detached views of the live tensors
        floats, others = _split(teacher_sd)
        t = [teacher_sd[key] for key in floats]
        s = [student_sd[key] for key in floats]
        if k == 0.0:
            torch._foreach_copy_(t, s)  # exact copy, even of non-finite values
        else:
            torch._foreach_mul_(t, k)
            torch._foreach_add_(t, s, alpha=1 - k)
        for key in others:  # a handful of counters: the reference formula, truncated
            teacher_sd[key].copy_(k * teacher_sd[key] + (1 - k) * student_sd[key])

    def state_dict(self) -> dict[str, Any]:
        """The teacher's weights and the number of updates done (k depends on it)."""
        return {"teacher": self.teacher.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (``teacher`` is optional: count only)."""
        if "teacher" in state:
            self.teacher.load_state_dict(state["teacher"])
        self.updates = int(state.get("updates", 0))
