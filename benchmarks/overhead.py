"""Step-time and memory overhead of MultiMix and its peers, measured through a real ``lightning.Trainer``.

What is measured
----------------
One training step is forward + loss + backward + optimizer step (SGD, momentum 0.9) of the same model on the same
batch size (b = 128 by default), through a real ``lightning.Trainer``: every method gets its own ``Trainer.fit``
(same initial weights), all fits of a repeat run at once in threads that a :class:`Turnstile` lets step one at a
time, in rounds of one step per method in a shuffled order. Step ``i`` of every method thus runs within the same
second or so, and load from other processes hits all methods alike. A small callback (:class:`StepTimer`) reads the
clock in ``on_train_batch_start`` and in ``on_train_batch_end`` (after the optimizer step and after MultiMix's own
``on_train_batch_end``, where the EMA teacher is updated), synchronising the device first. The first ``--warmup``
steps are excluded.

Methods: ``none`` (plain cross-entropy), ``mixup`` and ``cutmix`` (``torchvision.transforms.v2.MixUp``/``CutMix``
applied to the batch inside ``training_step``, the way their documentation shows), ``pairs``
(``MultiMix(mode="pairs")``, last-layer manifold mixup), ``multimix-N`` (``MultiMix(n_tuples=N)``), ``dense-1000``
(``MultiMix(n_tuples=1000, dense=True)``; ``r`` is the number of positions of the feature map: 7x7 = 49 for the
small CNN, 4x4 = 16 for PreActResNet-18) and ``distill-1000`` (``MultiMix(n_tuples=1000, distill=True)``, EMA
teacher).

How to read the tables
----------------------
* Trainer table: ``ms/step`` is the median of all timed steps over all repeats; ``ratio`` is the median of the
  step-by-step ratios (method step ``i`` / ``none`` step ``i``, same round), the number the targets refer to, with
  a bootstrap 95% confidence interval of that median (``met`` is left "unresolved" below 20 paired steps);
  ``extra ms`` is the median step-by-step difference to ``none``, which does not depend on the network (it
  transfers to a larger network with the same head); ``core ms`` and ``core share`` come from the second table;
  ``extra MB`` is the peak memory of the step above the ``none`` step's peak. On CUDA the peak is
  ``torch.cuda.max_memory_allocated`` during the step; on CPU it is the peak of live bytes of tensors allocated
  during one extra (untimed) step, tracked by :class:`benchmarks._memory.LiveTensorBytes`. ``distill`` also keeps a
  persistent copy of the model (the teacher), reported in the notes below the table.
* Core table ("the core alone"): the package's pure tensor functions on the tensors a real forward produced,
  without Lightning: ``sample`` (Dirichlet or Beta weights), ``mix`` (interpolation of logits and targets, or the
  torchvision transform of the images), ``loss`` (soft cross-entropy), ``backward`` (from the loss to the logits or
  feature map), ``other`` (dense: attention and per-position weights; distill: teacher forward and EMA update).
  When the installed package has the class-major logit path (``interpolation.interpolate_columns``) and the
  factorised dense loss (``dense.factorised_dense_logit_loss``), the table times those, as the callback runs them
  (the factorised dense loss does mixing and loss in one call, reported under ``mix``).
  ``share`` is the core total over the ``none`` Trainer step. The difference between a method's Trainer overhead and
  its core total is the callback's own cost (hooks, checks, logging).
* ``--core-alternatives`` times faster candidates for the core against the current functions on the same shapes
  (Dirichlet sampling, weight layout, soft cross-entropy, dense interpolation, Lightning's ``self.log``) and checks
  that each candidate gives the same result.

Clock and threads on CPU: by default a step's cost is the process CPU time it consumed (``--clock cpu``), with one
intra-op thread (``--threads 1``). On a machine shared with other jobs, wall time mostly measures the neighbours: a
pre-empted process loses whole scheduler slices, and OpenMP's barriers turn every parallel elementwise operator into
a wait for a pre-empted thread (milliseconds each). CPU time of a single-threaded process counts only the work done.
On CUDA the clock is wall time with the device synchronised (``--clock wall``); pass ``--threads 0`` to keep torch's
default thread count. On Linux CPU runs the script restarts itself with glibc malloc settings that keep freed memory
in the process (:data:`STABLE_MALLOC_ENV`; ``--no-malloc-tuning`` to skip): with glibc's defaults each fit's thread
pays page faults that depend on its allocator's history, which biased identical fits by up to 7%.

Examples::

    python benchmarks/overhead.py --quick                        # CI smoke run, tiny models, under a minute
    python benchmarks/overhead.py --models smallcnn --repeats 7 --core-alternatives
    python benchmarks/overhead.py --device cuda --repeats 5      # on a GPU machine
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import random
import sys
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: an A/B run can point it elsewhere

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._harness import format_table, machine_info, median, print_machine, write_csv
from benchmarks._memory import LiveTensorBytes
from lightning_multimix import MultiMix
from lightning_multimix.capture import Capture
from lightning_multimix.dense import (
    attention_from_scores,
    class_scores,
    dense_interpolate,
    dense_interpolate_targets,
    dense_weights,
)
from lightning_multimix.interpolation import interpolate, one_hot
from lightning_multimix.losses import soft_cross_entropy
from lightning_multimix.demo.models import PreActResNet18, SmallCNN
from lightning_multimix.sampling import dirichlet_weights, pair_weights
from lightning_multimix.teacher import EMATeacher

# what the callback runs, when the installed package has it (the class-major logit path and the factorised dense loss
# proposed from these benchmarks); the core-alone table then times the package's own path
_interpolate_columns = getattr(importlib.import_module("lightning_multimix.interpolation"), "interpolate_columns", None)
_factorised_dense = getattr(importlib.import_module("lightning_multimix.dense"), "factorised_dense_logit_loss", None)

NUM_CLASSES = 10
MB = 2.0**20


# ---------------------------------------------------------------------------------------------------- methods, models


@dataclass(frozen=True)
class Method:
    """One row of the tables: ``kind`` selects the code path, ``n_tuples`` the number of interpolations."""

    name: str
    kind: str
    n_tuples: Optional[int] = None


METHODS: tuple[Method, ...] = (
    Method("none", "none"),
    Method("mixup", "mixup"),
    Method("cutmix", "cutmix"),
    Method("pairs", "pairs"),
    Method("multimix-128", "multimix", 128),
    Method("multimix-1000", "multimix", 1000),
    Method("multimix-10000", "multimix", 10000),
    Method("dense-1000", "dense", 1000),
    Method("distill-1000", "distill", 1000),
)
METHOD_NAMES = tuple(m.name for m in METHODS)


@dataclass(frozen=True)
class ModelSpec:
    """A network, its input shape and the number of positions of its last feature map (dense MultiMix's ``r``)."""

    name: str
    input_shape: tuple[int, int, int]
    build: Callable[[Optional[int]], nn.Module]
    positions: int


MODELS: dict[str, ModelSpec] = {
    "smallcnn": ModelSpec(
        "smallcnn", (1, 28, 28), lambda w: SmallCNN(NUM_CLASSES, 1, **({} if w is None else {"width": w})), 49
    ),
    "preactresnet18": ModelSpec(
        "preactresnet18",
        (3, 32, 32),
        lambda w: PreActResNet18(NUM_CLASSES, 3, **({} if w is None else {"width": w})),
        16,
    ),
}

# the targets: ratio of the median step time to the no-mixing step time
TARGETS: dict[tuple[str, str], float] = {
    ("smallcnn", "multimix-1000"): 1.05,
    ("preactresnet18", "multimix-1000"): 1.02,
    ("smallcnn", "multimix-10000"): 1.15,
    ("smallcnn", "dense-1000"): 1.10,
    ("preactresnet18", "dense-1000"): 1.10,
}


def make_callback(method: Method, seed: int = 0) -> Optional[MultiMix]:
    """The MultiMix callback of a method, ``None`` for the methods that do not use it."""
    if method.kind == "pairs":
        return MultiMix(mode="pairs", seed=seed)
    if method.kind == "multimix":
        return MultiMix(n_tuples=method.n_tuples, seed=seed)
    if method.kind == "dense":
        return MultiMix(n_tuples=method.n_tuples, dense=True, seed=seed)
    if method.kind == "distill":
        return MultiMix(n_tuples=method.n_tuples, distill=True, seed=seed)
    return None


def make_batch_transform(method: Method) -> Optional[Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]]:
    """torchvision's batch transforms for the input-mixing peers (``None`` for the others)."""
    from torchvision.transforms import v2

    if method.kind == "mixup":
        return v2.MixUp(alpha=1.0, num_classes=NUM_CLASSES)
    if method.kind == "cutmix":
        return v2.CutMix(alpha=1.0, num_classes=NUM_CLASSES)
    return None


class BenchModule(L.LightningModule):
    """A typical classification module: cross-entropy on the (optionally input-mixed) batch, logged every step."""

    def __init__(self, net: nn.Module, batch_transform: Optional[Callable] = None, lr: float = 0.05) -> None:
        super().__init__()
        self.net = net
        self.batch_transform = batch_transform
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        target: Tensor = y
        if self.batch_transform is not None:
            x, target = self.batch_transform(x, y)
        loss = F.cross_entropy(self.net(x), target)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, batch_size=y.shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


# ---------------------------------------------------------------------------------------------------- timing helpers


_CLOCKS: dict[str, Callable[[], int]] = {"wall": time.perf_counter_ns, "cpu": time.thread_time_ns}
_clock: Callable[[], int] = time.perf_counter_ns


def set_clock(kind: str) -> None:
    """``"cpu"``: CPU time of the calling thread (insensitive to other jobs pre-empting this one; CPU device and one
    intra-op thread only), ``"wall"``: elapsed time."""
    global _clock
    _clock = _CLOCKS[kind]


def now_ns() -> int:
    return _clock()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Turnstile:
    """Exclusive turns, in rounds, for the threads that run one ``Trainer.fit`` each: step-level interleaving.

    A thread calls :meth:`turn` at the start of every training step; it returns when that thread may run one loop
    iteration (its step and the untimed work up to its next step) while every other thread waits. Every round gives
    each participant one turn, in an order shuffled per round (seeded), so no method always follows the same one.
    Turns start once every participant has reached its first step, so no fit's set-up overlaps another's timed step.
    :meth:`leave` removes a finished (or failed) participant.
    """

    def __init__(self, names: Sequence[str], seed: int = 0) -> None:
        self._cond = threading.Condition()
        self._members = list(names)
        self._waiting: set[str] = set()
        self._current: Optional[str] = None
        self._round: list[str] = []
        self._started = False
        self._rng = random.Random(seed)

    def _next(self) -> None:
        """Give the turn to the next participant (the lock is held)."""
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
            if name not in self._members:
                return
            self._members.remove(name)
            self._waiting.discard(name)
            if self._current in (name, None):
                self._next()


class StepTimer(Callback):
    """Time every training step between ``on_train_batch_start`` and ``on_train_batch_end``.

    Put it last in the ``callbacks`` list so that other callbacks' ``on_train_batch_end`` (MultiMix's EMA update)
    falls inside the window. Steps ``[warmup, warmup + timed)`` are kept; if ``track_memory``, step
    ``warmup + timed`` runs under :class:`LiveTensorBytes` (CPU) and is not timed. With a :class:`Turnstile`, every
    step waits for its turn first (outside the timed window).
    """

    def __init__(
        self,
        warmup: int,
        timed: int,
        device: torch.device,
        track_memory: bool = False,
        turnstile: Optional[Turnstile] = None,
        name: str = "",
    ) -> None:
        self.warmup, self.timed, self.device, self.track_memory = warmup, timed, device, track_memory
        self.turnstile, self.name = turnstile, name
        self.times_ms: list[float] = []
        self.peak_bytes: list[int] = []
        self._index = 0
        self._start_ns = 0
        self._base_bytes = 0
        self._tracker: Optional[LiveTensorBytes] = None

    def _leave(self) -> None:
        if self.turnstile is not None:
            self.turnstile.leave(self.name)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._leave()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._leave()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.turnstile is not None:
            self.turnstile.turn(self.name)
        synchronize(self.device)
        if self._index == self.warmup + self.timed and self.track_memory and self.device.type != "cuda":
            self._tracker = LiveTensorBytes()
            self._tracker.__enter__()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base_bytes = torch.cuda.memory_allocated(self.device)
        self._start_ns = now_ns()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
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


class Laps:
    """Accumulate the time between successive calls into named stages (device synchronised at each call)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stages: dict[str, float] = defaultdict(float)
        synchronize(device)
        self._last = now_ns()

    def __call__(self, stage: str) -> None:
        synchronize(self.device)
        now = now_ns()
        self.stages[stage] += (now - self._last) / 1e6
        self._last = now


def rotated(items: Sequence[Any], shift: int) -> list[Any]:
    """``items`` rotated left by ``shift`` (the interleaving order of one repeat)."""
    shift %= max(len(items), 1)
    return [*items[shift:], *items[:shift]]


def make_data(spec: ModelSpec, batch_size: int, batches: int, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * batch_size, *spec.input_shape, generator=generator)
    y = torch.randint(0, NUM_CLASSES, (batches * batch_size,), generator=generator)
    return TensorDataset(x, y)


# ---------------------------------------------------------------------------------------------------- Trainer path


@dataclass
class TrainerResult:
    times_ms: dict[str, list[list[float]]]  # method -> one list of step times per repeat
    peak_bytes: dict[str, list[int]]
    teacher_bytes: int


def fit_once(
    spec: ModelSpec,
    method: Method,
    args: argparse.Namespace,
    device: torch.device,
    track_memory: bool,
    turnstile: Optional[Turnstile] = None,
) -> StepTimer:
    """One ``Trainer.fit`` of ``method`` for ``warmup + steps (+1)`` steps; returns the timer with its samples."""
    total_steps = args.warmup + args.steps + (1 if track_memory and device.type != "cuda" else 0)
    with _build_lock:  # the same initial weights for every method, whatever thread builds first
        torch.manual_seed(0)
        net = spec.build(args.width)
    module = BenchModule(net, make_batch_transform(method))
    timer = StepTimer(args.warmup, args.steps, device, track_memory, turnstile, method.name)
    callbacks = [cb for cb in (make_callback(method), timer) if cb is not None]
    loader = DataLoader(make_data(spec, args.batch_size, total_steps), batch_size=args.batch_size, drop_last=True)
    try:
        trainer = L.Trainer(
            accelerator="cuda" if device.type == "cuda" else "cpu",
            devices=1,
            max_steps=total_steps,
            precision=args.precision,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=callbacks,
        )
        trainer.fit(module, train_dataloaders=loader)
    finally:
        timer._leave()
    return timer


_build_lock = threading.Lock()


def run_trainer(
    spec: ModelSpec, methods: Sequence[Method], args: argparse.Namespace, device: torch.device
) -> TrainerResult:
    """Every repeat runs one fit per method, each in its own thread, interleaved step by step by a turnstile."""
    times: dict[str, list[list[float]]] = defaultdict(list)
    peaks: dict[str, list[int]] = defaultdict(list)
    for repeat in range(args.repeats):
        order = rotated(methods, repeat)
        turnstile = Turnstile([m.name for m in order], seed=repeat)
        timers: dict[str, StepTimer] = {}
        errors: list[BaseException] = []

        def work(method: Method) -> None:
            try:
                timers[method.name] = fit_once(spec, method, args, device, repeat == 0, turnstile)
            except BaseException as error:  # re-raised in the main thread
                errors.append(error)

        threads = [threading.Thread(target=work, args=(m,), name=f"fit-{m.name}") for m in order]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        for method in order:
            times[method.name].append(timers[method.name].times_ms)
            peaks[method.name].extend(timers[method.name].peak_bytes)
            if args.verbose:
                step_ms = median(timers[method.name].times_ms)
                print(f"  [{spec.name}] repeat {repeat} {method.name}: median {step_ms:.1f} ms", flush=True)
    teacher = spec.build(args.width)
    teacher_bytes = sum(t.numel() * t.element_size() for t in [*teacher.parameters(), *teacher.buffers()])
    return TrainerResult(dict(times), dict(peaks), teacher_bytes)


def paired_ratios(result: TrainerResult, name: str) -> list[float]:
    """Step-by-step ratios ``name / none``: step ``i`` of both ran in the same round of the turnstile."""
    base = result.times_ms.get("none", [])
    return [mine / ref for steps, refs in zip(result.times_ms[name], base) for mine, ref in zip(steps, refs)]


def paired_differences(result: TrainerResult, name: str) -> list[float]:
    """Step-by-step differences ``name - none`` in ms (same rounds as :func:`paired_ratios`)."""
    base = result.times_ms.get("none", [])
    return [mine - ref for steps, refs in zip(result.times_ms[name], base) for mine, ref in zip(steps, refs)]


MIN_PAIRS_TO_JUDGE = 20


def judge(ratio: float, target: float, pairs: int, quick: bool) -> str:
    """``yes``/``NO`` against a target, or why not judged (a quick run, or too few paired steps to resolve it)."""
    if quick:
        return "n/a (quick)"
    if pairs < MIN_PAIRS_TO_JUDGE:
        return f"unresolved ({pairs} steps)"
    return "yes" if ratio <= target else "NO"


def median_ci(
    values: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Bootstrap confidence interval of the median (percentile method, seeded)."""
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    medians = sorted(median(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = (1.0 - level) / 2.0
    return medians[int(tail * resamples)], medians[min(resamples - 1, int((1.0 - tail) * resamples))]


# ---------------------------------------------------------------------------------------------------- the core alone


@dataclass
class CoreContext:
    """The tensors a real forward of the model produced, as leaves, plus what the core functions need."""

    net: nn.Module
    x: Tensor
    labels: Tensor
    embeddings: Tensor  # (b, d) leaf
    logits: Tensor  # (b, c) leaf
    features: Tensor  # (b, r, d) leaf
    generator: torch.Generator
    teacher: EMATeacher
    transforms: dict[str, Callable]
    device: torch.device


def make_core_context(spec: ModelSpec, args: argparse.Namespace, device: torch.device) -> CoreContext:
    torch.manual_seed(0)
    net = spec.build(args.width).to(device)
    x, labels = make_data(spec, args.batch_size, 1).tensors
    x, labels = x.to(device), labels.to(device)
    head, pool = Capture(net.fc), Capture(net.pool)
    with torch.no_grad(), head, pool:
        net(x)
    feature_map = pool.input
    head.remove()
    pool.remove()
    leaf = lambda t: t.detach().clone().requires_grad_(True)  # noqa: E731
    return CoreContext(
        net=net,
        x=x,
        labels=labels,
        embeddings=leaf(head.input) if head.input is not None else leaf(feature_map.mean((2, 3))),
        logits=leaf(head.output) if head.output is not None else leaf(net.fc(feature_map.mean((2, 3)))),
        features=leaf(feature_map.flatten(2).transpose(1, 2)),
        generator=torch.Generator(device=device),
        teacher=EMATeacher(net).to(device),
        transforms={k: make_batch_transform(Method(k, k)) for k in ("mixup", "cutmix")},
        device=device,
    )


def core_step(method: Method, ctx: CoreContext, laps: Laps, step: int) -> None:
    """One step of the core functions of ``method``, stage by stage, in the order the callback runs them."""
    b = ctx.labels.shape[0]
    ctx.generator.manual_seed(step)
    logits = ctx.logits
    if method.kind == "none":
        loss = F.cross_entropy(logits, ctx.labels)
        laps("loss")
        loss.backward()
        laps("backward")
        return
    if method.kind in ("mixup", "cutmix"):
        _, soft = ctx.transforms[method.kind](ctx.x, ctx.labels)
        laps("mix")
        loss = F.cross_entropy(logits, soft)  # the loss on the mixed batch has the same shapes
        laps("loss")
        loss.backward()
        laps("backward")
        return
    targets = one_hot(ctx.labels, logits.shape[-1])
    if method.kind == "distill":
        with torch.no_grad():
            teacher_probs = torch.softmax(ctx.teacher.module(ctx.x).float(), dim=-1)
        targets = 0.5 * targets + 0.5 * teacher_probs
        laps("other")
    if method.kind == "pairs":
        weights = pair_weights(b, 1.0, generator=ctx.generator, device=ctx.device)
    else:
        weights = dirichlet_weights(b, method.n_tuples, 1.0, generator=ctx.generator, device=ctx.device)
    laps("sample")
    class_dim = -1
    if method.kind == "dense":
        head = ctx.net.fc
        with torch.no_grad():
            attention = attention_from_scores(class_scores(ctx.features, head.weight, ctx.labels), "cam")
        if _factorised_dense is not None:  # the package's factorised dense loss: mixing and loss in one call
            laps("other")
            position_logits = F.linear(ctx.features, head.weight, head.bias)
            loss = _factorised_dense(position_logits, targets, weights, attention)
            laps("mix")
        else:
            per_position = dense_weights(weights, attention)
            laps("other")
            position_logits = F.linear(ctx.features, head.weight, head.bias)
            mixed_logits = dense_interpolate(position_logits, per_position)
            mixed_targets = dense_interpolate_targets(targets, per_position)
            laps("mix")
            loss = soft_cross_entropy(mixed_logits, mixed_targets)
            laps("loss")
    else:
        if _interpolate_columns is not None:  # the package's class-major layout: (c, n)
            mixed_logits, mixed_targets = _interpolate_columns(logits, weights), _interpolate_columns(targets, weights)
            class_dim = 0
        else:
            mixed_logits, mixed_targets = interpolate(logits, weights), interpolate(targets, weights)
        laps("mix")
        loss = soft_cross_entropy(mixed_logits, mixed_targets, dim=class_dim) if class_dim == 0 else soft_cross_entropy(
            mixed_logits, mixed_targets)
        laps("loss")
    loss.backward()
    laps("backward")
    if method.kind == "distill":
        ctx.teacher.update(ctx.net)
        laps("other")


CORE_STAGES = ("sample", "mix", "loss", "backward", "other")


def run_core(
    spec: ModelSpec, methods: Sequence[Method], args: argparse.Namespace, device: torch.device
) -> dict[str, dict[str, float]]:
    """Median time of every stage of every method's core (ms), methods interleaved in every repeat."""
    ctx = make_core_context(spec, args, device)
    samples: dict[str, dict[str, list[float]]] = {m.name: defaultdict(list) for m in methods}
    for repeat in range(args.core_warmup + args.core_repeats):
        for method in rotated(methods, repeat):
            for leaf in (ctx.logits, ctx.features):
                leaf.grad = None
            ctx.net.zero_grad(set_to_none=True)
            laps = Laps(device)
            core_step(method, ctx, laps, repeat)
            if repeat >= args.core_warmup:
                for stage in CORE_STAGES:
                    samples[method.name][stage].append(laps.stages.get(stage, 0.0))
    out: dict[str, dict[str, float]] = {}
    for name, stages in samples.items():
        out[name] = {stage: median(stages[stage]) for stage in CORE_STAGES}
        # the median of the per-step totals, not the sum of the stage medians
        totals = [sum(stages[s][i] for s in CORE_STAGES) for i in range(len(stages["sample"]))]
        out[name]["total"] = median(totals)
    return out


# ---------------------------------------------------------------------------------------------------- alternatives


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in ms."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        synchronize(device)
        start = now_ns()
        fn()
        synchronize(device)
        samples.append((now_ns() - start) / 1e6)
    return median(samples)


def time_interleaved(
    candidates: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median time (ms) of each candidate, candidates interleaved call by call."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = defaultdict(list)
    names = list(candidates)
    for repeat in range(repeats):
        for name in rotated(names, repeat):
            synchronize(device)
            start = now_ns()
            candidates[name]()
            synchronize(device)
            samples[name].append((now_ns() - start) / 1e6)
    return {name: median(samples[name]) for name in names}


def dirichlet_log1p(
    num_examples: int, n_tuples: int, *, generator: torch.Generator, device: torch.device, transposed: bool = False
) -> Tensor:
    """Candidate alpha == 1 fast path: ``Exponential(1) = -log(1 - U)``, ``U ~ Uniform[0, 1)`` from ``torch.rand``.

    ``1 - U`` lies in ``(0, 1]``, so every sample is finite and >= 0; ``transposed=True`` samples the matrix as
    ``(n, m)`` (normalising along contiguous memory) and returns its transpose, a view with the same values layout
    ``weights.T`` wants.
    """
    shape = (n_tuples, num_examples) if transposed else (num_examples, n_tuples)
    gammas = torch.rand(shape, generator=generator, device=device).neg_().log1p_().neg_()
    gammas.clamp_min_(torch.finfo(gammas.dtype).tiny)
    dim = -1 if transposed else 0
    gammas.div_(gammas.sum(dim, keepdim=True))
    return gammas.T if transposed else gammas


def soft_cross_entropy_dim(logits: Tensor, targets: Tensor, dim: int) -> Tensor:
    """Soft cross-entropy with the classes along ``dim``, averaged over every other index (float32)."""
    log_probs = torch.log_softmax(logits.float(), dim=dim)
    return -(targets.float() * log_probs).sum(dim).mean()


def class_major_logit_loss(logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    r"""Candidate MultiMix logit-space loss computed class-major: ``(c x m) @ (m x n)`` products, softmax over dim 0.

    Same value and gradient as ``soft_cross_entropy(interpolate(logits, w), interpolate(targets, w))``: only the
    memory layout of the ``n`` mixed rows changes (``(c, n)`` instead of ``(n, c)``). CPU BLAS computes the wide
    product ``(c x m) @ (m x n)`` several times faster than the skinny ``(n x m) @ (m x c)`` one.
    """
    mixed_logits = logits.to(weights.dtype).T @ weights  # (c, n)
    mixed_targets = targets.to(weights.dtype).T @ weights
    return soft_cross_entropy_dim(mixed_logits, mixed_targets, dim=0)


def dense_factorised_logit_loss(
    position_logits: Tensor,
    targets: Tensor,
    weights: Tensor,
    attention: Tensor,
    fallback: str = "where",
    class_major: bool = True,
) -> Tensor:
    r"""Candidate dense MultiMix loss without the ``(m, n, r)`` weight tensor.

    ``w_ikj = lambda_ik a_ij / D_kj`` with ``D = Lambda^T A`` (n x r), so
    ``sum_i w_ikj v_ij = (Lambda^T (A * V))_kj / D_kj``: one ``m``-deep matrix product for the logits and one for the
    targets, then a division. Where ``D_kj == 0`` the current code falls back to the plain MultiMix weights:
    ``fallback="where"`` reproduces that exactly with one more product (``Lambda^T V``) and a select;
    ``fallback="dead-positions"`` gives the positions where no example has attention a uniform attention instead,
    which is the same thing when every weight ``lambda_ik`` is positive (whole-batch tuples, ``tuple_size=None``)
    and costs nothing; ``fallback="none"`` drops it (wrong where a position has no attention). ``class_major``
    computes ``(r*c x m) @ (m x n)`` (layout ``(r, c, n)``, softmax over dim 1) instead of ``(n x m) @ (m x r*c)``.
    """
    m, r, c = position_logits.shape
    dtype = weights.dtype
    a = attention.to(dtype)  # (m, r), no grad
    if fallback == "dead-positions":
        a = torch.where(a.sum(0, keepdim=True) > 0, a, torch.ones_like(a))
    logits = position_logits.to(dtype)

    def mix(values: Tensor) -> Tensor:  # (m, r, f) -> (r, f, n) class-major or (n, r, f)
        flat = values.reshape(m, -1)
        if class_major:
            return (flat.T @ weights).view(values.shape[1], values.shape[2], -1)
        return (weights.T @ flat).view(-1, values.shape[1], values.shape[2])

    with torch.no_grad():
        denom = mix(a.unsqueeze(-1))  # (r, 1, n) or (n, r, 1)
        safe = denom.clamp_min(torch.finfo(dtype).tiny)
        mixed_targets = mix(a.unsqueeze(-1) * targets.to(dtype).unsqueeze(1)) / safe
    mixed_logits = mix(a.unsqueeze(-1) * logits) / safe
    if fallback == "where":
        ok = denom > 0
        mixed_logits = torch.where(ok, mixed_logits, mix(logits))
        mixed_targets = torch.where(ok, mixed_targets, mix(targets.to(dtype).unsqueeze(1)))
    return soft_cross_entropy_dim(mixed_logits, mixed_targets, dim=1 if class_major else -1)


def equal_note(reference: Callable[[], Tensor], candidate: Callable[[], Tensor], leaf: Tensor) -> str:
    """How far ``candidate``'s loss and gradient (with respect to ``leaf``) are from ``reference``'s."""
    results = []
    for fn in (reference, candidate):
        leaf.grad = None
        loss = fn()
        loss.backward()
        results.append((loss.detach(), leaf.grad.clone()))
    leaf.grad = None
    (loss_a, grad_a), (loss_b, grad_b) = results
    return f"|dloss| {float((loss_a - loss_b).abs()):.1e}, |dgrad| {float((grad_a - grad_b).abs().max()):.1e}"


def peak_bytes(fn: Callable[[], Any]) -> int:
    with LiveTensorBytes() as tracker:
        fn()
    return tracker.peak


def run_alternatives(args: argparse.Namespace, device: torch.device) -> list[tuple[str, str, str, str]]:
    """Time candidate replacements of the core against the current functions; print and return the rows."""
    rows: list[tuple[str, str, str, str]] = []  # (group, variant, shape, ms)
    reps = args.alt_repeats
    b = args.batch_size
    gen = torch.Generator(device=device).manual_seed(0)

    def report(group: str, shape: str, timings: dict[str, float], notes: Optional[dict[str, str]] = None) -> None:
        base = next(iter(timings.values()))
        table = []
        for name, ms in timings.items():
            extra = (notes or {}).get(name, "")
            table.append((name, f"{ms:.3f}", f"{ms / base:.2f}", extra))
            rows.append((group, name, shape, f"{ms:.4f}"))
        print(format_table(("variant", "ms", "vs first", "note"), table, title=f"\n[{group}] {shape}"))

    # A. Dirichlet sampling, m = b examples, n tuples, alpha = 1 (the default) and alpha = 0.5
    for n in (1000, 10000):
        candidates = {
            "current dirichlet_weights (exponential_)": lambda: dirichlet_weights(
                b, n, 1.0, generator=gen, device=device
            ),
            "_standard_gamma (the alpha != 1 path)": lambda: dirichlet_weights(b, n, 0.5, generator=gen, device=device),
            "-log1p(-rand), (m, n)": lambda: dirichlet_log1p(b, n, generator=gen, device=device),
            "-log1p(-rand), sampled (n, m), .T": lambda: dirichlet_log1p(
                b, n, generator=gen, device=device, transposed=True
            ),
            "torch.distributions.Dirichlet (global RNG)": lambda: torch.distributions.Dirichlet(
                torch.ones(n, b, device=device)
            ).sample(),
        }
        report("dirichlet sampling", f"m={b} n={n} alpha=1", time_interleaved(candidates, device, reps))
    # the fast path must draw Dirichlet(1) columns: moments of the weights against the exact ones
    sample = dirichlet_log1p(b, 20000, generator=gen, device=device).double()
    exact_var = (b - 1) / (b * b * (b + 1))
    print(
        f"check -log1p(-rand): column sums within {float((sample.sum(0) - 1).abs().max()):.1e} of 1; "
        f"mean {float(sample.mean()):.6f} (exact {1 / b:.6f}); var {float(sample.var()):.3e} (exact {exact_var:.3e}); "
        f"all finite: {bool(torch.isfinite(sample).all())}"
    )

    # B. Interpolation + loss + backward: logit space (current) vs class-major layout vs embedding space
    for spec_name, d in (("smallcnn", 128), ("preactresnet18", 512)):
        for n in (1000, 10000):
            head = nn.Linear(d, NUM_CLASSES).to(device)
            z = torch.randn(b, d, device=device, requires_grad=True)
            labels = torch.randint(0, NUM_CLASSES, (b,), device=device)
            y = one_hot(labels, NUM_CLASSES)
            w = dirichlet_weights(b, n, generator=gen, device=device)

            def current() -> Tensor:
                return soft_cross_entropy(interpolate(head(z), w), interpolate(y, w))

            def class_major() -> Tensor:
                return class_major_logit_loss(head(z), y, w)

            def embedding_space() -> Tensor:
                return soft_cross_entropy(head(interpolate(z, w)), interpolate(y, w))

            notes = {
                "class-major (c x m) @ (m x n)": equal_note(current, class_major, z),
                "embedding space (logit_space='never')": equal_note(current, embedding_space, z),
            }
            candidates = {
                "logit space, (n x m) @ (m x c) (current)": lambda: current().backward(),
                "class-major (c x m) @ (m x n)": lambda: class_major().backward(),
                "embedding space (logit_space='never')": lambda: embedding_space().backward(),
            }
            report("interpolation+loss+backward", f"{spec_name}: m={b} d={d} c={NUM_CLASSES} n={n}",
                   time_interleaved(candidates, device, reps), notes)

    # C. Soft cross-entropy on n x c, forward + backward
    for n in (1000, 10000):
        logits = torch.randn(n, NUM_CLASSES, device=device, requires_grad=True)
        targets = torch.softmax(torch.randn(n, NUM_CLASSES, device=device), -1)
        a = soft_cross_entropy(logits, targets).detach()
        bb = F.cross_entropy(logits, targets).detach()
        candidates = {
            "soft_cross_entropy (current)": lambda: soft_cross_entropy(logits, targets).backward(),
            "F.cross_entropy(probability targets)": lambda: F.cross_entropy(logits, targets).backward(),
        }
        report("soft cross-entropy fwd+bwd", f"n={n} c={NUM_CLASSES}", time_interleaved(candidates, device, reps),
               {"F.cross_entropy(probability targets)": f"|diff| {float((a - bb).abs()):.1e}"})

    # D. Dense MultiMix: current (m, n, r) weights + einsum vs factorised matrix products
    for spec_name, r, d in (("smallcnn", 49, 128), ("preactresnet18", 16, 512)):
        n = 1000
        head = nn.Linear(d, NUM_CLASSES).to(device)
        features = torch.randn(b, r, d, device=device, requires_grad=True)
        labels = torch.randint(0, NUM_CLASSES, (b,), device=device)
        targets = one_hot(labels, NUM_CLASSES)
        weights = dirichlet_weights(b, n, generator=gen, device=device)
        with torch.no_grad():
            attention = attention_from_scores(class_scores(features, head.weight, labels), "cam")
        attention[0] = 0.0  # an example without attention anywhere
        attention[:, 0] = 0.0  # a position where no example has attention: exercises the fallback

        def current() -> Tensor:
            per_position = dense_weights(weights, attention)
            logits = F.linear(features, head.weight, head.bias)
            mixed_targets = dense_interpolate_targets(targets, per_position)
            return soft_cross_entropy(dense_interpolate(logits, per_position), mixed_targets)

        def factorised(fallback: str = "where", class_major: bool = True) -> Callable[[], Tensor]:
            def loss() -> Tensor:
                logits = F.linear(features, head.weight, head.bias)
                return dense_factorised_logit_loss(logits, targets, weights, attention, fallback, class_major)
            return loss

        variants = {
            "current (dense_weights + einsum)": current,
            "factorised, (n x m) @ (m x rc)": factorised(class_major=False),
            "factorised, class-major (rc x m) @ (m x n)": factorised(),
            "factorised, class-major, dead positions uniform": factorised(fallback="dead-positions"),
            "factorised, class-major, no fallback": factorised(fallback="none"),
        }
        notes = {name: equal_note(current, fn, features) for name, fn in variants.items() if fn is not current}
        for name, fn in variants.items():
            peak = peak_bytes(lambda: fn().backward())
            notes[name] = (notes.get(name, "") + f"; peak {peak / MB:.1f} MB").lstrip("; ")
        notes["factorised, class-major, no fallback"] += " (differs: a position has no attention)"
        candidates = {name: (lambda fn=fn: fn().backward()) for name, fn in variants.items()}
        report("dense fwd+bwd", f"{spec_name}: m={b} n={n} r={r} d={d} c={NUM_CLASSES}",
               time_interleaved(candidates, device, reps), notes)

    # E. Lightning's self.log inside a real training step (the callback logs one value per step, two with distill)
    log_us = measure_log_cost(device, args.batch_size)
    print(f"\n[lightning self.log] one self.log(..., on_step=True, on_epoch=True) call in training_step: "
          f"{log_us:.0f} us (median)")
    rows.append(("lightning self.log", "one call", "on_step+on_epoch", f"{log_us / 1000:.4f}"))
    return rows


class _LogCostModule(L.LightningModule):
    """Times one extra ``self.log`` per training step, as MultiMix issues it."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, NUM_CLASSES)
        self.samples_us: list[float] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.layer(x), y)
        start = now_ns()
        self.log("multimix/loss", loss.detach(), on_step=True, on_epoch=True, batch_size=y.shape[0])
        self.samples_us.append((now_ns() - start) / 1e3)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def measure_log_cost(device: torch.device, batch_size: int, steps: int = 60) -> float:
    data = TensorDataset(torch.randn(steps * batch_size, 8), torch.randint(0, NUM_CLASSES, (steps * batch_size,)))
    module = _LogCostModule()
    trainer = L.Trainer(accelerator="cuda" if device.type == "cuda" else "cpu", devices=1, max_steps=steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(data, batch_size=batch_size))
    return median(module.samples_us[5:])


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--models", default="smallcnn,preactresnet18", help="comma-separated: " + ",".join(MODELS))
    parser.add_argument("--methods", default=",".join(METHOD_NAMES), help="comma-separated subset of the methods")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=None, help="override both models' width (default: 32 and 64)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every fit")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per fit")
    parser.add_argument("--repeats", type=int, default=5, help="fits per method (methods interleaved)")
    parser.add_argument("--core-repeats", type=int, default=30, help="timed steps of the core-alone table")
    parser.add_argument("--core-warmup", type=int, default=3)
    parser.add_argument("--core-alternatives", action="store_true", help="also time candidate core implementations")
    parser.add_argument("--only-alternatives", action="store_true", help="skip the Trainer and core tables")
    parser.add_argument("--alt-repeats", type=int, default=30, help="timed calls per candidate")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    parser.add_argument("--precision", default="32-true", help="Trainer precision, e.g. bf16-mixed on a GPU")
    parser.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                        help="what a step costs: 'cpu' = process CPU time (default on CPU: robust to other jobs on a "
                             "shared machine), 'wall' = elapsed time (default on CUDA)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU; 0 keeps the default")
    parser.add_argument("--out", default=None, help="folder for the overhead_<tag>_*.csv files (default: none with "
                                                    "--quick, else benchmarks/results)")
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="keep glibc's default malloc settings (default on CPU: restart with STABLE_MALLOC_ENV)")
    parser.add_argument("--tag", default=None, help="name part of the CSV files (default: the models, e.g. "
                                                    "overhead_smallcnn_trainer.csv)")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: tiny models, few steps (under a minute)")
    parser.add_argument("--verbose", action="store_true", help="print every fit's median as it finishes")
    args = parser.parse_args(argv)
    if args.only_alternatives:
        args.core_alternatives = True
    if args.quick:
        args.width = args.width or 8
        args.warmup, args.steps, args.repeats = 1, 2, 1
        args.core_repeats, args.core_warmup, args.alt_repeats = 3, 1, 3
    if args.out is None and not args.quick:
        args.out = str(Path(__file__).resolve().parent / "results")
    return args


#: glibc malloc settings for CPU runs: keep freed memory in the process (no trimming, no per-step mmap/munmap of
#: large tensors), so that steps do not pay page faults that depend on the allocator's history in each thread.
#: Measured without them, identical ``none`` fits in different threads differed by up to 7% (CI excluding 1).
STABLE_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),  # glibc's maximum; also freezes the dynamic threshold
    "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30),
    "MALLOC_TOP_PAD_": str(2**30),
}


def reexec_with_stable_malloc(args: argparse.Namespace) -> None:
    """Restart this script with :data:`STABLE_MALLOC_ENV` set (Linux, CPU device, unless ``--no-malloc-tuning``)."""
    if args.no_malloc_tuning or not sys.platform.startswith("linux") or not args.device.startswith("cpu"):
        return
    if all(os.environ.get(key) == value for key, value in STABLE_MALLOC_ENV.items()):
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **STABLE_MALLOC_ENV})


def quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if argv is None:  # run from the command line: restarting the process is possible
        reexec_with_stable_malloc(args)
    quiet_lightning()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.clock == "auto":
        args.clock = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        raise SystemExit("--clock cpu counts the calling thread's CPU time only: it needs --threads 1")
    if args.clock == "cpu" and device.type == "cuda":
        raise SystemExit("--clock cpu measures host CPU time, which says nothing about CUDA kernels: use --clock wall")
    set_clock(args.clock)
    unknown = set(args.methods.split(",")) - set(METHOD_NAMES)
    if unknown or "none" not in args.methods.split(","):
        raise SystemExit(f"--methods must include 'none' and come from {METHOD_NAMES}; got unknown {sorted(unknown)}")
    methods = [m for m in METHODS if m.name in args.methods.split(",")]
    specs = [MODELS[name] for name in args.models.split(",")]

    started = time.perf_counter()
    print_machine(machine_info(str(device)))
    import lightning_multimix

    print(f"package: {Path(lightning_multimix.__file__).parent} (class-major logit path: "
          f"{'yes' if _interpolate_columns else 'no'}, factorised dense loss: {'yes' if _factorised_dense else 'no'})")
    print(f"settings: batch={args.batch_size} warmup={args.warmup} steps={args.steps} repeats={args.repeats} "
          f"width={args.width or 'default'} precision={args.precision} clock={args.clock} quick={args.quick}")
    tuned = all(os.environ.get(key) == value for key, value in STABLE_MALLOC_ENV.items())
    print("malloc: " + (" ".join(f"{k}={v}" for k, v in STABLE_MALLOC_ENV.items()) if tuned else "glibc defaults"))
    headers = ("model", "method", "r", f"ms/step ({args.clock})", "extra ms", "ratio", "95% CI", "target", "met",
               "core ms", "core share", "extra MB")
    context = [device.type, args.threads, args.batch_size, args.width or "default", args.precision]
    trainer_csv: list[list[Any]] = []
    steps_csv: list[list[Any]] = []
    core_csv: list[list[Any]] = []
    alt_csv: list[list[Any]] = []
    for spec in [] if args.only_alternatives else specs:
        trainer_result = run_trainer(spec, methods, args, device)
        core = run_core(spec, methods, args, device)
        base_ms = median([t for rep in trainer_result.times_ms["none"] for t in rep])
        base_peak = median(trainer_result.peak_bytes.get("none", [])) if trainer_result.peak_bytes.get("none") else None
        for method in methods:
            for repeat, steps in enumerate(trainer_result.times_ms[method.name]):
                steps_csv += [[spec.name, method.name, repeat, i, f"{ms:.3f}", args.clock]
                              for i, ms in enumerate(steps)]
        rows = []
        for method in methods:
            pooled = [t for rep in trainer_result.times_ms[method.name] for t in rep]
            ratios = paired_ratios(trainer_result, method.name)
            ratio = median(ratios)
            low, high = median_ci(ratios)
            extra_ms = median(paired_differences(trainer_result, method.name))
            target = TARGETS.get((spec.name, method.name))
            met = "" if target is None else judge(ratio, target, len(ratios), args.quick)
            peaks = trainer_result.peak_bytes.get(method.name)
            extra = (median(peaks) - base_peak) / MB if peaks and base_peak is not None else float("nan")
            core_total = core[method.name]["total"]
            row = [spec.name, method.name, spec.positions if method.kind == "dense" else "", f"{median(pooled):.1f}",
                   f"{extra_ms:+.1f}", f"{ratio:.3f}", f"{low:.3f}-{high:.3f}",
                   "" if target is None else f"<= {target:.2f}", met, f"{core_total:.2f}",
                   f"{100 * core_total / base_ms:.1f}%", f"{extra:.2f}"]
            rows.append(row)
            trainer_csv.append([*row, *context])
        print()
        title = f"== Trainer step, {spec.name}, b={args.batch_size}, device={device} =="
        print(format_table(headers, rows, title=title))
        print(f"notes: distill keeps a persistent teacher copy of {trainer_result.teacher_bytes / MB:.2f} MB "
              "(parameters + buffers), not in 'extra MB'; 'extra MB' is the peak above the 'none' step's peak.")
        core_rows = []
        for method in methods:
            stages = core[method.name]
            core_rows.append([spec.name, method.name, *(f"{stages[s]:.3f}" for s in CORE_STAGES),
                              f"{stages['total']:.3f}", f"{100 * stages['total'] / base_ms:.1f}%"])
            core_csv.append([*core_rows[-1], *context])
        print()
        print(format_table(("model", "method", *CORE_STAGES, "total", "share"), core_rows,
                           title=f"== The core alone (ms, medians of {args.core_repeats}), {spec.name} =="))
    if args.core_alternatives:
        print("\n== Core alternatives (medians, candidates interleaved) ==")
        alt_csv = [[*row, *context] for row in run_alternatives(args, device)]
    if args.out:
        context_headers = ("device", "threads", "batch", "width", "precision")
        out = Path(args.out)
        tag = args.tag or "-".join(spec.name for spec in specs)
        written = []
        if trainer_csv:
            write_csv(out / f"overhead_{tag}_trainer.csv", (*headers, *context_headers), trainer_csv)
            write_csv(out / f"overhead_{tag}_core.csv",
                      ("model", "method", *CORE_STAGES, "total", "share", *context_headers), core_csv)
            write_csv(out / f"overhead_{tag}_steps.csv", ("model", "method", "repeat", "step", "ms", "clock"),
                      steps_csv)
            written += [f"overhead_{tag}_trainer.csv", f"overhead_{tag}_core.csv", f"overhead_{tag}_steps.csv"]
        if alt_csv:
            write_csv(out / "overhead_alternatives.csv", ("group", "variant", "shape", "ms", *context_headers), alt_csv)
            written.append("overhead_alternatives.csv")
        print(f"\nwrote {', '.join(str(out / name) for name in written)}")
    print(f"total time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
