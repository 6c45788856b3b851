"""Two fixes to Ray Data 2.60's streaming executor, installed in every Ray process of a job.

1. Paced while it has nothing to wait for.

Each Ray Data stream a Train run reads (labeled, unlabeled, CutMix partner) is driven by a
scheduling loop in its ``SplitCoordinator`` actor. In Ray 2.60 that loop blocks in
``ray.wait(timeout=0.1)`` only while it has tasks in flight; when every operator is held back
(the consumer's queue is full, which is the steady state of a pipeline faster than training),
it spins. Measured on a 2-core machine with the digits run: three coordinators took ~35% of a
core each, and the training worker ran at 6.7 images/s instead of 66.

:func:`install` wraps the loop's step so that an idle step (no task in flight) sleeps
``IDLE_SLEEP_S`` before the next one. A new task then starts at most that late after the
consumer frees a slot, far below one training step.

2. Never starved of CPUs by its neighbours. In 2.60 an execution's CPU budget is what the
cluster-wide ``AutoscalingCoordinator`` reserved for it: Ray Train's workers first, then the
earlier requesters' bundles, then the leftover split by *integer* division among the rest. A
stream that starts while others hold their bundles (the unlabeled streams after a labeled-only
burn-in, found with ``dssn.burn_in_epochs`` on 2 CPUs) gets a budget of 0 CPUs, so it never
submits a task, never measures a rate to ask for more, and the training loop that waits on it
holds the other streams' outputs: a deadlock ("Cluster resources are not enough to run any
task ... may hang forever"). :func:`install` floors each execution's CPU/GPU budget at what the
cluster has (the pre-coordinator behaviour); Ray Core's scheduler then queues the tasks of
concurrent streams, as it does for any tasks. Memory budgets stay the coordinator's.

Every Ray process gets both through the job's ``worker_process_setup_hook``
(:func:`runtime_env`), the driver by calling :func:`install` directly.
"""

from __future__ import annotations

import time
from typing import Any

IDLE_SLEEP_S = 0.02
CLUSTER_POLL_S = 5.0  # how long this process reuses ray.cluster_resources()
SETUP_HOOK = "dssn.data.pacing.install"  # worker_process_setup_hook: a module path Ray imports
_MARK = "_dssn_paced"


def install() -> bool:
    """Pace Ray Data's scheduling loop and floor its CPU budgets in this process (idempotent).
    False when this Ray has no such loop (another version's internals): then nothing is
    changed."""
    floor_cpu_budgets()
    try:
        from ray.data._internal.execution.streaming_executor import StreamingExecutor
    except ImportError:
        return False
    original = getattr(StreamingExecutor, "_scheduling_loop_step", None)
    if original is None:
        return False
    if getattr(original, _MARK, False):
        return True

    def paced_step(self, topology) -> bool:
        more = original(self, topology)
        if more and not any(op.num_active_tasks() for op in topology):
            time.sleep(IDLE_SLEEP_S)  # nothing in flight: ray.wait did not block, so we do
        return more

    setattr(paced_step, _MARK, True)
    StreamingExecutor._scheduling_loop_step = paced_step
    return True


_cluster: dict[str, Any] = {"at": float("-inf"), "resources": {}}


def cluster_cpus_gpus() -> tuple[float, float]:
    """(CPUs, GPUs) of the whole cluster, refreshed every ``CLUSTER_POLL_S`` seconds."""
    import ray

    now = time.monotonic()
    if now - _cluster["at"] >= CLUSTER_POLL_S:
        _cluster["resources"], _cluster["at"] = ray.cluster_resources(), now
    res = _cluster["resources"]
    return float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))


def floored(reserved: Any, cpus: float, gpus: float) -> Any:
    """``reserved`` (ExecutionResources) with its CPU and GPU raised to at least the
    cluster's; memory and object store unchanged."""
    return reserved.copy(cpu=max(reserved.cpu, cpus), gpu=max(reserved.gpu, gpus))


def floor_cpu_budgets() -> int:
    """Floor ``get_total_resources`` of Ray Data's cluster autoscalers at the cluster's CPUs
    and GPUs (idempotent). Returns how many autoscaler classes are patched."""
    import importlib

    patched = 0
    for module, name in (
        ("rate_based_cluster_autoscaler", "RateBasedClusterAutoscaler"),
        ("default_cluster_autoscaler_v2", "DefaultClusterAutoscalerV2"),
    ):
        try:
            path = f"ray.data._internal.cluster_autoscaler.{module}"
            cls = getattr(importlib.import_module(path), name)
        except (ImportError, AttributeError):
            continue
        original = cls.get_total_resources
        if not getattr(original, _MARK, False):

            def get_total_resources(self, _original=original):
                return floored(_original(self), *cluster_cpus_gpus())

            setattr(get_total_resources, _MARK, True)
            cls.get_total_resources = get_total_resources
        patched += 1
    return patched


def installed() -> bool:
    """Whether this process has both fixes: the scheduling loop paced, the budgets floored."""
    from ray.data._internal.cluster_autoscaler.rate_based_cluster_autoscaler import (
        RateBasedClusterAutoscaler,
    )
    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    return getattr(StreamingExecutor._scheduling_loop_step, _MARK, False) and getattr(
        RateBasedClusterAutoscaler.get_total_resources, _MARK, False
    )


def runtime_env(env: dict[str, Any] | None = None) -> dict[str, Any]:
    """``env`` (a Ray runtime_env) with the setup hook that paces every worker process."""
    return {**(env or {}), "worker_process_setup_hook": SETUP_HOOK}
