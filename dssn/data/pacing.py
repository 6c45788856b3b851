"""Four fixes to Ray Data 2.60's streaming executor, installed in every Ray process of a job.

1. Paced while it has nothing to wait for.

Each Ray Data stream a Train run reads (labeled, unlabeled, CutMix partner) is driven by a
scheduling loop in its ``SplitCoordinator`` actor. In Ray 2.60 that loop blocks in
``ray.wait(timeout=0.1)`` only while it has tasks in flight; when every operator is held back
(the consumer's queue is full, which is the steady state of a pipeline faster than training),
it spins. Measured on a 2-core machine with the digits run: three coordinators took ~35% of a
core each, and the training worker ran at 6.7 images/s instead of 66.

:func:`install` wraps the loop's step so that an idle step (no task in flight) sleeps
``IDLE_SLEEP_S`` (50 ms) before the next one. A new task then starts at most that late after
the consumer frees a slot, far below one training step. (It was 20 ms until 2026-12-06: the
three coordinators of a 2-worker digits run then took ~15% of a core between them, at 50 ms
~8%, with the training workers' data wait unchanged at ~2.5%.)

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

3. Woken by the first task that finishes. The loop waits for its tasks with ``ray.wait(all of
them, num_returns=all of them, timeout=0.1 s)``: with two or more tasks in flight it returns
only when *every* task has output or the 0.1 s have passed, so a task that finishes waits up to
0.1 s before the loop takes its block, frees its CPU and submits the next task. (With one task in
flight there is no delay, which is why one CPU did not show it.) :func:`responsive_wait` returns
as soon as one task has output that the loop has not been shown yet; output it has been shown
and left unread (its consumer is full) does not wake it again, so a held-back pipeline sleeps as
before instead of spinning.

4. Block metadata fetched inline. Ray 2.60 hands each finished block's metadata to a background
thread (``RAY_DATA_METADATA_PREFETCH_ON_THREAD``, default on) whose results the loop emits, and
whose task it marks done, only at its *next* step: another wait of up to 0.1 s. Inline, the loop
``ray.get``s the metadata (a few hundred bytes, local on one node) and releases the task at
once. An explicit ``RAY_DATA_METADATA_PREFETCH_ON_THREAD`` in the environment is respected.

Measured on this 2-core machine, 2 CPUs, 1,536 rows of 32-row tasks (~0.19 s each): the two
augmenting workers sat idle between tasks for 0.1-0.8 s (the CPUs ~40% idle) and the stream gave
158-181 samples/s; with 3 and 4, 263-278 samples/s, the CPUs 9-10% idle. Any node running
several read/augment tasks at once (a GPU node feeding its trainer) loses the same share.

Every Ray process gets all four through the job's ``worker_process_setup_hook``
(:func:`runtime_env`), the driver by calling :func:`install` directly. The same hook keeps Ray
Data's per-execution INFO lines off the console (:func:`quiet_console`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from typing import Any

IDLE_SLEEP_S = 0.05
CLUSTER_POLL_S = 5.0  # how long this process reuses ray.cluster_resources()
SETUP_HOOK = "dssn.data.pacing.install"  # worker_process_setup_hook: a module path Ray imports
_MARK = "_dssn_paced"
PREFETCH_ENV = "RAY_DATA_METADATA_PREFETCH_ON_THREAD"
CONSOLE_ENV = "DSSN_RAY_DATA_CONSOLE"  # console level of Ray Data's logger (default WARNING)
# Ray Train 2.60's own DataConfig sets this option on every run; nothing a user can change
TRAIN_DEPRECATION = r"`ExecutionOptions\.exclude_resources` is deprecated"


def install() -> bool:
    """Pace Ray Data's scheduling loop and floor its CPU budgets in this process (idempotent),
    with Ray Data's INFO lines off the console (:func:`quiet_console`). False when this Ray has
    no such loop (another version's internals): then the loop is left as it is."""
    quiet_console()
    floor_cpu_budgets()
    wake_on_first_output()
    fetch_metadata_inline()
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
    """Whether this process has the four fixes: the scheduling loop paced, the budgets floored,
    the loop woken by the first task with output, block metadata fetched inline."""
    from ray.data._internal.cluster_autoscaler.rate_based_cluster_autoscaler import (
        RateBasedClusterAutoscaler,
    )
    from ray.data._internal.execution import metadata_fetcher, streaming_executor_state
    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    return (
        getattr(StreamingExecutor._scheduling_loop_step, _MARK, False)
        and getattr(RateBasedClusterAutoscaler.get_total_resources, _MARK, False)
        and isinstance(streaming_executor_state.ray, _RayWithResponsiveWait)
        and (PREFETCH_ENV in os.environ or not metadata_fetcher._PREFETCH_ON_THREAD)
    )


_shown = threading.local()  # per scheduling loop (thread): outputs its last wait returned


def _position(waitable: Any) -> bytes:
    """What a wait is waiting for: an ObjectRef itself; for a streaming generator, the ref of its
    next output (it changes once the loop reads that output)."""
    import ray

    if isinstance(waitable, ray.ObjectRef):
        return waitable.binary()
    try:
        core_worker = waitable.worker.core_worker
        ref, _ = core_worker.peek_object_ref_stream(waitable._generator_ref)
        return ref.binary()
    except Exception:  # another version's internals: keyed by the generator itself, so once
        return b"%d" % id(waitable)  # shown it waits as plain ray.wait would (no spinning)


def responsive_wait(
    waitables: list, *, num_returns: int = 1, timeout: float | None = None, fetch_local=True
) -> tuple[list, list]:
    """``ray.wait`` for Ray Data's scheduling loop (fix 3 above): a call for all of
    ``waitables`` with a timeout returns as soon as one of them has output its previous call did
    not return (or at the timeout), with every one ready at that moment. Other calls are plain
    ``ray.wait``."""
    import ray

    if num_returns < len(waitables) or not timeout:
        return ray.wait(
            waitables, num_returns=num_returns, timeout=timeout, fetch_local=fetch_local
        )
    positions = {w: _position(w) for w in waitables}
    shown = getattr(_shown, "positions", set())
    new = [w for w in waitables if positions[w] not in shown]
    if new:
        ray.wait(new, num_returns=1, timeout=timeout, fetch_local=fetch_local)
        ready, rest = ray.wait(
            waitables, num_returns=len(waitables), timeout=0, fetch_local=fetch_local
        )
    else:  # every one was shown and left unread: as Ray would (no spinning on them)
        ready, rest = ray.wait(
            waitables, num_returns=num_returns, timeout=timeout, fetch_local=fetch_local
        )
    _shown.positions = {positions[w] for w in ready}
    return ready, rest


class _RayWithResponsiveWait:
    """The ``ray`` module as the scheduling loop's module sees it, with :func:`responsive_wait`
    as its ``wait``."""

    wait = staticmethod(responsive_wait)

    def __getattr__(self, name: str) -> Any:
        import ray

        return getattr(ray, name)


def wake_on_first_output() -> bool:
    """Fix 3 in this process (idempotent). False when this Ray has no such module."""
    try:
        from ray.data._internal.execution import streaming_executor_state as state
    except ImportError:
        return False
    if not isinstance(state.ray, _RayWithResponsiveWait):
        state.ray = _RayWithResponsiveWait()
    return True


def fetch_metadata_inline() -> bool:
    """Fix 4 in this process, unless ``RAY_DATA_METADATA_PREFETCH_ON_THREAD`` is set. False when
    this Ray has no such switch."""
    try:
        from ray.data._internal.execution import metadata_fetcher
    except ImportError:
        return False
    if not hasattr(metadata_fetcher, "_PREFETCH_ON_THREAD"):
        return False
    if PREFETCH_ENV not in os.environ:
        metadata_fetcher._PREFETCH_ON_THREAD = False
    return True


def console_level() -> str:
    """The level named by ``DSSN_RAY_DATA_CONSOLE`` (default WARNING), checked."""
    from dssn.config import ConfigError  # a ValueError the CLI prints in one line

    value = os.environ.get(CONSOLE_ENV, "WARNING")
    level = value.strip().upper()
    if not isinstance(logging.getLevelName(level), int):
        raise ConfigError(
            f"{CONSOLE_ENV}={value!r} is not a logging level: use DEBUG, INFO, WARNING or ERROR"
        )
    return level


def _not_the_bar_hint(record: logging.LogRecord) -> bool:
    """False for Ray Data's "Progress bars disabled. To enable, set ..." (a warning, once per
    process: three lines a run). It is logged only where the bars are off, as a local Ray
    started by ``dssn`` sets them (``RAY_DATA_DISABLE_PROGRESS_BARS``)."""
    return not str(record.msg).startswith("Progress bars disabled")


def quiet_console() -> bool:
    """Ray Data's console handler at :func:`console_level`, and Ray Train's deprecation warning
    about its own use of ``exclude_resources`` silenced, in this process.

    Every execution of a stream (three a training epoch) logs "Starting execution", its plan
    and "execution finished in N s" at INFO from its coordinator, streamed to the driver: ~9
    lines an epoch between the training lines. They stay in Ray Data's log files
    (``<session>/logs/ray-data/``). Its warnings ("... may hang forever") stay on the console,
    but for the hint that its progress bars are off. ``DSSN_RAY_DATA_CONSOLE=INFO`` shows the
    INFO lines again; a ``RAY_DATA_LOGGING_CONFIG`` of the user's own is left as it is. False
    where this Ray configures its logging otherwise."""
    level = console_level()
    warnings.filterwarnings("ignore", message=TRAIN_DEPRECATION)
    try:
        from ray.data._internal import logging as data_logging
    except ImportError:
        return False
    progress = logging.getLogger("ray.data._internal.progress")
    if logging.getLevelName(level) > logging.INFO and _not_the_bar_hint not in progress.filters:
        progress.addFilter(_not_the_bar_hint)
    console = getattr(data_logging, "DEFAULT_CONFIG", {}).get("handlers", {}).get("console")
    if not isinstance(console, dict):
        return False
    if console.get("level") != level:
        console["level"] = level  # every later configure_logging() reads this dict again
        data_logging.configure_logging()
    return True


def runtime_env(env: dict[str, Any] | None = None) -> dict[str, Any]:
    """``env`` (a Ray runtime_env) with the setup hook that paces every worker process, and
    ``DSSN_RAY_DATA_CONSOLE`` passed on where this process has it set."""
    out = {**(env or {}), "worker_process_setup_hook": SETUP_HOOK}
    if CONSOLE_ENV in os.environ:
        out["env_vars"] = {**out.get("env_vars", {}), CONSOLE_ENV: os.environ[CONSOLE_ENV]}
    return out
