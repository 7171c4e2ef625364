"""Timing a training step fairly on a shared machine: interleaved fits, a CPU-time clock, paired ratios.

Every method of a comparison gets its own ``Trainer.fit`` in its own thread; a :class:`Turnstile` lets the threads
step one at a time, in rounds of one step per method in a shuffled order, so that load from other processes hits every
method alike. :class:`StepTimer` reads the clock between ``on_train_batch_start`` and ``on_train_batch_end`` (after
the optimizer step, and after the callbacks placed before it). On CPU the clock is the thread's CPU time with one
intra-op thread (a pre-empted process loses wall time, not CPU time); on CUDA it is wall time with the device
synchronised. Ratios are taken step by step (method step ``i`` over the baseline's step ``i``, same round) and
summarised by their median with a bootstrap confidence interval.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Callable, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks._memory import LiveTensorBytes

_CLOCKS: dict[str, Callable[[], int]] = {"wall": time.perf_counter_ns, "cpu": time.thread_time_ns}
_clock: Callable[[], int] = time.perf_counter_ns

#: glibc malloc settings for CPU runs: keep freed memory in the process (no trimming, no per-step mmap/munmap of large
#: tensors), so that steps do not pay page faults that depend on each thread's allocator history (measured without
#: them, identical fits in different threads differed by up to 7%).
STABLE_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30),
                     "MALLOC_TOP_PAD_": str(2**30)}


def set_clock(kind: str) -> None:
    """``"cpu"``: CPU time of the calling thread (one intra-op thread, CPU device); ``"wall"``: elapsed time."""
    global _clock
    _clock = _CLOCKS[kind]


def now_ns() -> int:
    return _clock()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reexec_with_stable_malloc(device: str) -> None:
    """Restart the running script with :data:`STABLE_MALLOC_ENV` (Linux, CPU), unless it already has it."""
    if not sys.platform.startswith("linux") or not device.startswith("cpu"):
        return
    if all(os.environ.get(key) == value for key, value in STABLE_MALLOC_ENV.items()):
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **STABLE_MALLOC_ENV})


class Turnstile:
    """Exclusive turns, in rounds, for the threads that run one ``Trainer.fit`` each (see the module docstring).

    Turns start once every participant has reached its first step (no fit's set-up overlaps another's timed step);
    :meth:`leave` removes a finished or failed participant, so a failure never leaves the others waiting.
    """

    def __init__(self, names: Sequence[str], seed: int = 0) -> None:
        self._cond = threading.Condition()
        self._members, self._waiting = list(names), set()
        self._current: Optional[str] = None
        self._round: list[str] = []
        self._started = False
        self._rng = random.Random(seed)

    def _next(self) -> None:
        self._current = None
        if not self._started and self._members and self._waiting >= set(self._members):
            self._started = True
        if self._started and self._members:
            self._round = [name for name in self._round if name in self._members]
            if not self._round:
                self._round = list(self._members)
                self._rng.shuffle(self._round)
            self._current = self._round.pop(0)
        self._cond.notify_all()

    def turn(self, name: str) -> None:
        with self._cond:
            self._waiting.add(name)
            if self._current in (name, None):
                self._next()
            self._cond.wait_for(lambda: self._current == name)
            self._waiting.discard(name)

    def leave(self, name: str) -> None:
        with self._cond:
            if name in self._members:
                self._members.remove(name)
                self._waiting.discard(name)
                if self._current in (name, None):
                    self._next()


class StepTimer(Callback):
    """Times steps ``[warmup, warmup + timed)``; with ``track_memory`` the next step runs under
    :class:`~benchmarks._memory.LiveTensorBytes` (CPU) untimed, or records ``max_memory_allocated`` (CUDA). Place it
    last among the callbacks so that theirs ``on_train_batch_end`` (the EMA teacher's update) is inside the window."""

    def __init__(self, warmup: int, timed: int, device: torch.device, track_memory: bool = False,
                 turnstile: Optional[Turnstile] = None, name: str = "") -> None:
        self.warmup, self.timed, self.device, self.track_memory = warmup, timed, device, track_memory
        self.turnstile, self.name = turnstile, name
        self.times_ms: list[float] = []
        self.peak_bytes: list[int] = []
        self._index = self._start_ns = self._base_bytes = 0
        self._tracker: Optional[LiveTensorBytes] = None

    def leave(self) -> None:
        if self.turnstile is not None:
            self.turnstile.leave(self.name)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.leave()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.leave()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.turnstile is not None:
            self.turnstile.turn(self.name)
        synchronize(self.device)
        if self._index == self.warmup + self.timed and self.track_memory and self.device.type != "cuda":
            self._tracker = LiveTensorBytes().__enter__()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base_bytes = torch.cuda.memory_allocated(self.device)
        self._start_ns = now_ns()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        synchronize(self.device)
        elapsed_ms = (now_ns() - self._start_ns) / 1e6
        index, self._index = self._index, self._index + 1
        if self._tracker is not None:
            self._tracker.__exit__(None, None, None)
            self.peak_bytes.append(self._tracker.peak)
            self._tracker = None
        elif self.warmup <= index < self.warmup + self.timed:
            self.times_ms.append(elapsed_ms)
            if self.device.type == "cuda":
                self.peak_bytes.append(torch.cuda.max_memory_allocated(self.device) - self._base_bytes)


def run_interleaved(fits: dict[str, Callable[[Turnstile], StepTimer]], seed: int) -> dict[str, StepTimer]:
    """Run every ``fits[name](turnstile)`` (one ``Trainer.fit``, returning its timer) in its own thread, stepping in
    turns; re-raise the first failure."""
    turnstile = Turnstile(list(fits), seed=seed)
    timers: dict[str, StepTimer] = {}
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            timers[name] = fits[name](turnstile)
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            errors.append(error)
        finally:
            turnstile.leave(name)

    threads = [threading.Thread(target=work, args=(name,), name=f"fit-{name}") for name in fits]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return timers


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def median_ci(values: Sequence[float], level: float = 0.95, resamples: int = 2000,
              seed: int = 0) -> tuple[float, float]:
    """Bootstrap confidence interval of the median (percentile method, seeded)."""
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    medians = sorted(median(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = (1.0 - level) / 2.0
    return medians[int(tail * resamples)], medians[min(resamples - 1, int((1.0 - tail) * resamples))]


def time_interleaved(candidates: dict[str, Callable[[], Any]], device: torch.device, repeats: int,
                     warmup: int = 3) -> dict[str, list[float]]:
    """Times (ms) of every candidate over ``repeats`` calls, candidates interleaved call by call."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            synchronize(device)
            start = now_ns()
            candidates[name]()
            synchronize(device)
            samples[name].append((now_ns() - start) / 1e6)
    return samples
