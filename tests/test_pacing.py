"""Ray Data's scheduling loop fixes (dssn.data.pacing), in the driver and in workers."""

from __future__ import annotations

import logging
import time
import warnings

import pytest

from dssn.data import pacing


class FakeOp:
    def __init__(self, active: int):
        self.active = active

    def num_active_tasks(self) -> int:
        return self.active


@pytest.fixture
def stub_loop(monkeypatch):
    """The executor's step replaced by one that only counts calls, then paced."""
    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    calls = []
    monkeypatch.setattr(
        StreamingExecutor, "_scheduling_loop_step", lambda self, topology: calls.append(1) or True
    )
    assert pacing.install()
    return StreamingExecutor._scheduling_loop_step, calls


def timed(step, topology) -> float:
    start = time.perf_counter()
    for _ in range(5):
        assert step(None, topology) is True
    return (time.perf_counter() - start) / 5


def test_idle_step_sleeps_and_busy_step_does_not(stub_loop):
    step, calls = stub_loop
    idle = timed(step, {FakeOp(0): None, FakeOp(0): None})
    busy = timed(step, {FakeOp(0): None, FakeOp(2): None})
    assert len(calls) == 10  # the original step runs every time
    assert idle >= 0.9 * pacing.IDLE_SLEEP_S
    assert busy < pacing.IDLE_SLEEP_S / 4


def test_install_is_idempotent(stub_loop):
    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    step, _ = stub_loop
    assert pacing.install() and pacing.installed()
    assert StreamingExecutor._scheduling_loop_step is step  # not wrapped twice


def test_runtime_env_keeps_the_callers_fields(monkeypatch):
    monkeypatch.delenv(pacing.CONSOLE_ENV, raising=False)
    env = pacing.runtime_env({"env_vars": {"A": "1"}})
    assert env == {"env_vars": {"A": "1"}, "worker_process_setup_hook": pacing.SETUP_HOOK}
    monkeypatch.setenv(pacing.CONSOLE_ENV, "INFO")  # passed on to every process of the job
    env = pacing.runtime_env({"env_vars": {"A": "1"}})
    assert env["env_vars"] == {"A": "1", pacing.CONSOLE_ENV: "INFO"}


def console_handler() -> logging.Handler:
    (handler,) = [h for h in logging.getLogger("ray.data").handlers if h.name == "console"]
    return handler


@pytest.fixture
def ray_data_console(monkeypatch):
    """Ray Data's default logging config restored after the test."""
    from ray.data._internal import logging as data_logging

    console = data_logging.DEFAULT_CONFIG["handlers"]["console"]
    monkeypatch.setitem(console, "level", console["level"])
    monkeypatch.delenv("RAY_DATA_LOGGING_CONFIG", raising=False)
    yield data_logging
    data_logging.configure_logging()


def test_ray_datas_info_lines_leave_the_console_and_stay_in_its_log_file(
    monkeypatch, ray_data_console
):
    from ray.data._internal.execution import streaming_executor

    monkeypatch.delenv(pacing.CONSOLE_ENV, raising=False)
    assert pacing.quiet_console()
    record = logging.getLogger(streaming_executor.__name__).makeRecord(
        "ray.data", logging.INFO, __file__, 1, "Starting execution of Dataset x.", None, None
    )
    assert console_handler().level == logging.WARNING
    assert record.levelno < console_handler().level  # "Starting execution ...": not shown
    (file_handler,) = [h for h in logging.getLogger("ray.data").handlers if h.name == "file"]
    assert record.levelno >= file_handler.level  # still written to ray-data.log
    progress = logging.getLogger("ray.data._internal.progress")
    hint = progress.makeRecord(
        progress.name, logging.WARNING, __file__, 1, "Progress bars disabled. To enable", None, None
    )
    warning = progress.makeRecord(progress.name, logging.WARNING, __file__, 1, "slow", None, None)
    assert not progress.filter(hint) and progress.filter(warning)
    ray_data_console.configure_logging()  # Ray Data configures again for each dataset
    assert console_handler().level == logging.WARNING
    monkeypatch.setenv(pacing.CONSOLE_ENV, "info")
    assert pacing.quiet_console() and console_handler().level == logging.INFO


def test_a_bad_console_level_is_named(monkeypatch):
    monkeypatch.setenv(pacing.CONSOLE_ENV, "LOUD")
    with pytest.raises(ValueError, match="DSSN_RAY_DATA_CONSOLE='LOUD' is not a logging level"):
        pacing.quiet_console()


def test_ray_trains_own_deprecation_warning_is_silenced_and_others_are_not(ray_data_console):
    from ray.data._internal.execution.interfaces.execution_options import (
        ExecutionOptions,
        ExecutionResources,
    )

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert pacing.quiet_console()
        ExecutionOptions(exclude_resources=ExecutionResources.zero())  # as Ray Train's DataConfig
        ExecutionOptions(actor_locality_enabled=False)  # another deprecation: still warned
    messages = [str(w.message) for w in caught]
    assert not any("exclude_resources" in m for m in messages)
    assert any("actor_locality_enabled" in m for m in messages)


@pytest.mark.ray
def test_every_ray_worker_is_paced(ray_instance):
    """Tasks and actors of the job, also those with a runtime_env of their own (as the Tune
    trial's fit task and Ray Data's split coordinators), run the setup hook."""
    ray = ray_instance

    @ray.remote(num_cpus=0)
    def task() -> bool:
        handlers = logging.getLogger("ray.data").handlers  # Ray Data's INFO lines: file only
        quiet = [h.level for h in handlers if h.name == "console"] == [logging.WARNING]
        return pacing.installed() and quiet

    @ray.remote(num_cpus=0)
    class Actor:
        def paced(self) -> bool:
            handlers = logging.getLogger("ray.data").handlers
            quiet = [h.level for h in handlers if h.name == "console"] == [logging.WARNING]
            return pacing.installed() and quiet

    env = {"env_vars": {"DSSN_TEST": "1"}}
    actor = Actor.options(runtime_env=env).remote()
    results = [task.remote(), task.options(runtime_env=env).remote(), actor.paced.remote()]
    assert ray.get(results) == [True, True, True]  # (a list is truthy whatever it holds)
    ray.kill(actor)


def test_budget_floor_raises_cpus_and_gpus_only():
    from ray.data._internal.execution.interfaces.execution_options import ExecutionResources

    reserved = ExecutionResources(cpu=0.0, gpu=0.0, object_store_memory=100.0, memory=5.0)
    out = pacing.floored(reserved, cpus=2.0, gpus=1.0)
    assert (out.cpu, out.gpu, out.object_store_memory, out.memory) == (2.0, 1.0, 100.0, 5.0)
    more = ExecutionResources(cpu=8.0, gpu=0.0, object_store_memory=1.0, memory=1.0)
    assert pacing.floored(more, cpus=2.0, gpus=0.0).cpu == 8.0  # never lowered


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("rate_based_cluster_autoscaler", "RateBasedClusterAutoscaler"),
        ("default_cluster_autoscaler_v2", "DefaultClusterAutoscalerV2"),
    ],
)
def test_a_stream_reserved_nothing_still_gets_the_clusters_cpus(monkeypatch, module, name):
    """The deadlock's state: the coordinator reserved this execution nothing (others hold the
    CPUs). Unpatched, its budget is 0 CPUs and it never submits a task."""
    import importlib

    cls = getattr(importlib.import_module(f"ray.data._internal.cluster_autoscaler.{module}"), name)

    class Coordinator:  # what the coordinator answers a starved requester
        def get_reserved_resources(self):
            return {}

    autoscaler = object.__new__(cls)
    autoscaler._autoscaling_coordinator = Coordinator()
    assert pacing.floor_cpu_budgets() == 2
    monkeypatch.setattr(pacing, "cluster_cpus_gpus", lambda: (2.0, 0.0))
    budget = autoscaler.get_total_resources()
    assert budget.cpu == 2.0 and budget.gpu == 0.0
    assert pacing.floor_cpu_budgets() == 2  # idempotent: not wrapped twice
    assert autoscaler.get_total_resources().cpu == 2.0


@pytest.fixture
def fresh_wait():
    """responsive_wait with nothing shown yet in this thread."""
    pacing._shown.positions = set()
    yield pacing.responsive_wait
    pacing._shown.positions = set()


@pytest.mark.ray
def test_wait_returns_with_the_first_finished_task_not_at_the_timeout(ray_instance, fresh_wait):
    """Ray Data waits for all its tasks (num_returns=all) with a timeout; the first task with
    output must wake it. Output it was shown and left unread must not wake it again."""
    ray = ray_instance

    @ray.remote(num_cpus=0)
    def sleep(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    fast, slow = sleep.remote(0.05), sleep.remote(60.0)
    start = time.perf_counter()
    ready, rest = fresh_wait([fast, slow], num_returns=2, timeout=20.0, fetch_local=False)
    assert (ready, rest) == ([fast], [slow])
    assert time.perf_counter() - start < 10.0  # plain ray.wait: the whole 20 s
    start = time.perf_counter()
    ready, rest = fresh_wait([fast, slow], num_returns=2, timeout=0.5, fetch_local=False)
    assert (ready, rest) == ([fast], [slow])
    assert time.perf_counter() - start >= 0.45  # not woken again by `fast`: no spinning
    ray.cancel(slow, force=True)


@pytest.mark.ray
def test_wait_follows_a_streaming_generator_past_the_output_it_read(ray_instance, fresh_wait):
    """Ray Data's tasks are streaming generators: once the loop reads an output, the next one
    (or the end of the stream) wakes it again."""
    ray = ray_instance

    @ray.remote(num_cpus=0, num_returns="streaming")
    def blocks():
        yield 1
        time.sleep(0.3)
        yield 2

    @ray.remote(num_cpus=0)
    def sleep(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    gen, slow = blocks.remote(), sleep.remote(60.0)
    ready, _ = fresh_wait([gen, slow], num_returns=2, timeout=20.0, fetch_local=False)
    assert ready == [gen]
    assert ray.get(next(gen)) == 1
    start = time.perf_counter()
    ready, _ = fresh_wait([gen, slow], num_returns=2, timeout=20.0, fetch_local=False)
    assert ready == [gen] and time.perf_counter() - start < 10.0
    assert ray.get(next(gen)) == 2
    ray.cancel(slow, force=True)


def test_block_metadata_is_fetched_inline_unless_the_environment_says(monkeypatch):
    from ray.data._internal.execution import metadata_fetcher as mf

    monkeypatch.delenv(pacing.PREFETCH_ENV, raising=False)
    monkeypatch.setattr(mf, "_PREFETCH_ON_THREAD", True)
    assert pacing.fetch_metadata_inline()
    assert isinstance(mf.make_metadata_fetcher(), mf.InlineMetadataFetcher)
    monkeypatch.setenv(pacing.PREFETCH_ENV, "1")
    monkeypatch.setattr(mf, "_PREFETCH_ON_THREAD", True)
    assert pacing.fetch_metadata_inline()
    assert isinstance(mf.make_metadata_fetcher(), mf.ThreadedMetadataFetcher)


def test_the_loops_ray_wait_is_the_responsive_one():
    from ray.data._internal.execution import streaming_executor_state as state

    assert pacing.wake_on_first_output() and pacing.wake_on_first_output()
    assert state.ray.wait is pacing.responsive_wait
    assert state.ray.ObjectRef is __import__("ray").ObjectRef  # the rest is Ray's own
