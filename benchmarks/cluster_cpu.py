"""CPU seconds of this process and its descendants (a local Ray cluster), process by process.
Shared by ``benchmarks/data.py`` and ``benchmarks/scaling.py``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class ClusterCPU:
    """CPU seconds used by this process and all its descendants (the local Ray cluster: GCS,
    raylet, workers), read at the start, at the end and every ``interval`` s between, so that
    workers that exit mid-measurement are still counted up to their last reading (processes
    that exit are counted in :attr:`exited`; the caller can set such a measurement aside).
    Measures Ray's real cost on a machine shared with other users, process by process: the
    driver (this process), Ray's task worker processes (``ray::IDLE`` / ``ray::MapBatches…``),
    Ray's own actors and agents (``ray::_StatsActor``, ``ray::_AutoscalingCoordinatorActor``,
    ``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) and the rest (GCS, raylet).

    Reading every 0.1 s (as this meter first did) cost the driver ~0.12 ms of CPU a sample
    (subtracted, but competing with the pipeline for the cores); once a second, a tenth of
    that. In warm passes no process starts or exits, so nothing is lost between readings.

    With ``history=True`` every reading is kept with its time and the processes' names, for
    :meth:`cores_between` (a window inside a longer run, e.g. one training epoch)."""

    KINDS = ("driver", "worker", "service", "daemon")

    def __init__(self, interval: float = 1.0, history: bool = False):
        self.interval, self.seen, self.baseline, self.own_cpu = interval, {}, {}, 0.0
        self.kinds: dict[tuple, str] = {}  # a process's kind as first seen
        self.alive: set[tuple] = set()  # processes found by the latest reading
        self.history: list[tuple[float, dict[tuple, tuple[float, str]]]] | None = (
            [] if history else None
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _poll(self) -> None:
        import importlib

        import ray  # noqa: F401  (puts Ray's bundled psutil on the path)

        psutil = importlib.import_module("psutil")

        me = psutil.Process()
        alive, reading = set(), {}
        for proc in [me, *me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                key = (proc.pid, proc.create_time())
                if key not in self.kinds:
                    # the kind it had when first seen: a pooled worker that later hosts an
                    # actor is not counted twice
                    self.kinds[key] = self._kind(proc, me)
                self.seen[key] = t.user + t.system
                alive.add(key)
                if self.history is not None:
                    reading[key] = (self.seen[key], "driver" if key[0] == me.pid else proc.name())
            except psutil.Error:
                pass
        self.alive = alive
        if self.history is not None:
            self.history.append((time.time(), reading))

    @staticmethod
    def _kind(proc, me) -> str:
        if proc.pid == me.pid:
            return "driver"
        if proc.name().startswith(("ray::_", "ray::DashboardAgent", "ray::RuntimeEnv")):
            return "service"
        if proc.name().startswith("ray::"):  # task workers (IDLE / MapBatches(…))
            return "worker"
        return "daemon"

    @property
    def started(self) -> int:
        """Processes that started after the first reading."""
        return len(set(self.seen) - set(self.baseline))

    @property
    def exited(self) -> int:
        """Processes that exited before the last reading (CPU after their last reading lost)."""
        return len(set(self.seen) - self.alive)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()
        self.own_cpu = time.thread_time()  # this thread's polling, not the pipeline's work

    def __enter__(self):
        self._poll()
        self.baseline = dict(self.seen)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()

    def seconds(self, kind: str | None = None) -> float:
        """CPU seconds since ``__enter__`` of one kind of process (:attr:`KINDS`), or of all
        (None); the poller's own CPU is left out of the driver's."""
        total = sum(
            v - self.baseline.get(k, 0.0)
            for k, v in self.seen.items()
            if kind is None or self.kinds[k] == kind
        )
        return total - self.own_cpu if kind in (None, "driver") else total

    def _window(self, start: float, end: float) -> tuple[int, int]:
        """Indices of the readings nearest to the Unix times ``start`` and ``end``."""
        if not self.history or len(self.history) < 2:
            raise ValueError("cores_between needs a ClusterCPU(history=True) with two readings")
        first = min(range(len(self.history)), key=lambda i: abs(self.history[i][0] - start))
        last = min(range(len(self.history)), key=lambda i: abs(self.history[i][0] - end))
        if last <= first:
            raise ValueError(f"window {start:.1f}..{end:.1f} holds fewer than two readings")
        return first, last

    def started_between(self, start: float, end: float) -> int:
        """Processes first read inside the window (as :meth:`cores_between` reads it): a Ray
        worker process that starts costs ~3 CPU-s of imports, so a few of them move the cores
        a window shows."""
        first, last = self._window(start, end)
        before = set(self.history[first][1])
        new = set()
        for _, reading in self.history[first + 1 : last + 1]:
            new.update(set(reading) - before)
        return len(new)

    def cores_between(
        self, start: float, end: float, classify: Callable[[str], str]
    ) -> tuple[dict[str, float], float]:
        """Cores in use (CPU seconds per second) by kind of process between the readings
        nearest to the Unix times ``start`` and ``end``, and the window's length in seconds.
        A process's kind is ``classify`` of its name at the later reading ("driver" for this
        process); a process that started inside the window counts from zero, one that exited
        counts up to its last reading in the window. Needs ``history=True``."""
        first, last = self._window(start, end)
        t0, before = self.history[first]
        t1 = self.history[last][0]
        latest: dict[tuple, tuple[float, str]] = {}
        for _, reading in self.history[first : last + 1]:
            latest.update(reading)
        cores: dict[str, float] = {}
        for key, (cpu, name) in latest.items():
            kind = classify(name)
            used = cpu - before.get(key, (0.0, name))[0]
            cores[kind] = cores.get(kind, 0.0) + used / (t1 - t0)
        return cores, t1 - t0
