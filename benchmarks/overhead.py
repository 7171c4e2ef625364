"""What does MultiMix add to a training step? Step time and memory of every method against no mixing.

A step (forward, loss, backward, optimizer step, the callbacks' ``on_train_batch_end``) of the same model on the same
batches through a real ``Trainer``, each method's fit in its own thread, the fits stepping in shuffled rounds. Methods:
``none``; torchvision's ``mixup`` / ``cutmix`` in the step; the callback's ``input-mixup`` (``probability=0``),
``pairs``, ``multimix-N`` (``n_tuples=N, probability=1``), ``protocol-1000`` (``MultiMix()``), ``dense-N``,
``distill-1000``; ``*-in-step``: the package's functions in ``training_step``, no callback. Trainer table: median
ms/step, extra ms and ratio to ``none`` (step-by-step medians, bootstrap 95% interval), extra peak memory. Core table:
the package's functions alone on one forward's tensors, by stage; ``callback's own``: the extra ms less the core total.
CPU: thread CPU time, one thread, glibc malloc settings that keep freed memory; CUDA: wall clock, synchronised. Files
in ``--out``: ``overhead_<model>_<device>.md`` and ``.csv``.

Examples::

    python benchmarks/overhead.py --quick                                   # smoke run, tiny model, seconds
    python benchmarks/overhead.py --warmup 30 --steps 20 --repeats 5        # the published CPU table
    python benchmarks/overhead.py --model preactresnet18 --device cuda      # the paper's network on a GPU
"""

import argparse
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._harness import (OUT_DIR, format_table, machine_info, print_machine, quiet, results_header,
                                 script_parser, write_csv, write_report)
from lightning_multimix import Dense, MultiMix, SelfDistillation, mixup_objective, multimix_objective
from lightning_multimix.batch import InputMixer
from lightning_multimix.demo.models import PreActResNet18, SmallCNN
from lightning_multimix.interpolation import mix_with_partner
from lightning_multimix.sampling import dirichlet_weights, mixup_pairing, pair_weights
from lightning_multimix.teacher import Distiller

#: glibc malloc settings for CPU runs: keep freed memory in the process, so that steps do not pay page faults that
#: depend on each thread's allocator history (without them, identical fits in different threads differed by up to 7%)
STABLE_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30),
                     "MALLOC_TOP_PAD_": str(2**30)}
NUM_CLASSES, MB = 10, 2.0**20


def clock(device: torch.device) -> Callable[[], int]:
    """Thread CPU time on the CPU (one torch thread), wall time on a GPU."""
    return time.perf_counter_ns if device.type == "cuda" else time.thread_time_ns


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reexec_with_stable_malloc(device: str) -> None:
    if sys.platform.startswith("linux") and device.startswith("cpu") and any(
            os.environ.get(key) != value for key, value in STABLE_MALLOC_ENV.items()):
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **STABLE_MALLOC_ENV})


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def median_ci(values: Sequence[float], resamples: int = 2000) -> tuple[float, float]:
    """Bootstrap 95% confidence interval of the median (percentile method, seeded)."""
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = random.Random(0)
    medians = sorted(median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples)]


class LiveTensorBytes(TorchDispatchMode):
    """The peak of live bytes of tensors created while active (the CPU allocator keeps no peak statistic): storages
    operators return, by weak reference, not aliases of an input. Slows every operator: never time under it."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for key in [key for key, (ref, _) in self._live.items() if ref.expired()]:
            self.current -= self._live.pop(key)[1]
        returns = func._schema.returns
        outputs = out if isinstance(out, (tuple, list)) and len(returns) > 1 else (out,)
        for schema_return, value in zip(returns, outputs):
            if schema_return.alias_info is not None:
                continue
            for tensor in tree_leaves(value):
                if isinstance(tensor, torch.Tensor):
                    ref = StorageWeakRef(tensor.untyped_storage())
                    if ref.cdata not in self._live:
                        self._live[ref.cdata] = (ref, tensor.untyped_storage().nbytes())
                        self.current += self._live[ref.cdata][1]
        self.peak = max(self.peak, self.current)
        return out


class Turnstile:
    """Turns, in shuffled rounds, for the threads that run a fit each, once all reached their first step."""

    def __init__(self, names: Sequence[str], seed: int = 0) -> None:
        self._cond, self._rng = threading.Condition(), random.Random(seed)
        self._members, self._waiting, self._round = list(names), set(), []
        self._current: Optional[str] = None
        self._started = False

    def _next(self) -> None:
        self._started = self._started or self._waiting >= set(self._members)
        self._current = None
        if self._started and self._members:
            self._round = ([name for name in self._round if name in self._members]
                           or self._rng.sample(self._members, len(self._members)))
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
                if self._current in (name, None):
                    self._next()


class StepTimer(L.Callback):
    """Times steps ``[warmup, warmup + timed)`` (placed last: the callbacks' ``on_train_batch_end`` inside), then
    with ``track_memory`` one more under :class:`LiveTensorBytes` (CPU); CUDA: ``max_memory_allocated``."""

    def __init__(self, warmup: int, timed: int, device: torch.device, track_memory: bool, turnstile: Turnstile,
                 name: str) -> None:
        self.warmup, self.timed, self.device, self.track_memory = warmup, timed, device, track_memory
        self.turnstile, self.name, self.clock = turnstile, name, clock(device)
        self.times_ms: list[float] = []
        self.peak_bytes: list[int] = []
        self._index = self._start_ns = self._base_bytes = 0
        self._tracker: Optional[LiveTensorBytes] = None

    def on_train_batch_start(self, *_: Any) -> None:
        self.turnstile.turn(self.name)
        synchronize(self.device)
        if self._index == self.warmup + self.timed and self.track_memory and self.device.type != "cuda":
            self._tracker = LiveTensorBytes().__enter__()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base_bytes = torch.cuda.memory_allocated(self.device)
        self._start_ns = self.clock()

    def on_train_batch_end(self, *_: Any) -> None:
        synchronize(self.device)
        elapsed_ms = (self.clock() - self._start_ns) / 1e6
        index, self._index = self._index, self._index + 1
        if self._tracker is not None:
            self._tracker.__exit__(None, None, None)
            self.peak_bytes.append(self._tracker.peak)
            self._tracker = None
        elif self.warmup <= index < self.warmup + self.timed:
            self.times_ms.append(elapsed_ms)
            if self.device.type == "cuda":
                self.peak_bytes.append(torch.cuda.max_memory_allocated(self.device) - self._base_bytes)


@dataclass(frozen=True)
class Method:
    name: str
    callback: dict[str, Any] = field(default_factory=dict)  # MultiMix's arguments; empty: no callback
    transform: Optional[str] = None  # in training_step: "mixup", "cutmix", "input-mixup" or "multimix-1000"


METHODS: tuple[Method, ...] = (
    Method("none"),
    Method("mixup", transform="mixup"),
    Method("cutmix", transform="cutmix"),
    Method("input-mixup", {"probability": 0.0}),
    Method("input-mixup-in-step", transform="input-mixup"),
    Method("pairs", {"mode": "pairs", "probability": 1.0}),
    Method("multimix-1000", {"n_tuples": 1000, "probability": 1.0}),
    Method("multimix-1000-in-step", transform="multimix-1000"),
    Method("multimix-10000", {"n_tuples": 10000, "probability": 1.0}),
    Method("protocol-1000", {"n_tuples": 1000}),
    Method("dense-1000", {"n_tuples": 1000, "probability": 1.0, "dense": Dense()}),
    Method("dense-10000", {"n_tuples": 10000, "probability": 1.0, "dense": Dense()}),
    Method("distill-1000", {"n_tuples": 1000, "probability": 1.0, "distill": SelfDistillation()}),
)
#: targets set for the ratio to ``none``, (model, method) -> ratio
TARGETS = {("smallcnn", "multimix-1000"): 1.01, ("smallcnn", "multimix-10000"): 1.05,
           ("smallcnn", "dense-1000"): 1.10, ("smallcnn", "distill-1000"): 1.36, ("smallcnn", "input-mixup"): 1.01,
           ("preactresnet18", "multimix-1000"): 1.02}
MODELS: dict[str, tuple[Callable[[Optional[int]], nn.Module], tuple[int, int, int], int]] = {  # net, input, r
    "smallcnn": (lambda w: SmallCNN(NUM_CLASSES, 1, **({"width": w} if w else {})), (1, 28, 28), 49),
    "preactresnet18": (lambda w: PreActResNet18(NUM_CLASSES, 3, **({"width": w} if w else {})), (3, 32, 32), 16),
}


class BenchModule(L.LightningModule):
    """Cross-entropy, the loss logged every step (also ``step_cost.py``'s); ``transform``: torchvision's ``mixup`` /
    ``cutmix`` of the batch, or the package's objective in the step itself (``input-mixup``, ``multimix-1000``)."""

    def __init__(self, net: nn.Module, transform: Optional[str] = None) -> None:
        super().__init__()
        self.net, self.kind, self.generator = net, transform, None
        self.transform: Optional[Callable[..., Any]] = None
        if transform in ("mixup", "cutmix"):
            from torchvision.transforms import v2

            self.transform = (v2.MixUp if transform == "mixup" else v2.CutMix)(num_classes=NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.kind in ("input-mixup", "multimix-1000"):
            if self.generator is None:
                self.generator = torch.Generator(device=self.device).manual_seed(0)
            if self.kind == "input-mixup":
                lam, partner = mixup_pairing(y.shape[0], 1.0, generator=self.generator, device=self.device)
                loss = mixup_objective(self(mix_with_partner(x, lam, partner)), y, lam, partner)
            else:
                weights = dirichlet_weights(y.shape[0], 1000, 1.0, generator=self.generator, device=self.device)
                loss = multimix_objective(weights, y, logits=self(x))
        else:
            target: Tensor = y
            if self.transform is not None:
                if x.dim() == 2:  # torchvision's MixUp takes image batches only
                    mixed, target = self.transform(x.view(*x.shape, 1, 1), y)
                    x = mixed.view(x.shape)
                else:
                    x, target = self.transform(x, y)
            loss = F.cross_entropy(self(x), target)
        self.log("train/loss", loss, on_step=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def batches(shape: tuple[int, int, int], batch_size: int, count: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(count * batch_size, *shape, generator=g),
                         torch.randint(0, NUM_CLASSES, (count * batch_size,), generator=g))


def fit(method: Method, args: argparse.Namespace, device: torch.device, memory: bool, turnstile: Any) -> StepTimer:
    """One ``Trainer.fit`` of ``method`` (its ``MultiMix`` first, the timer last); its timer."""
    timer = StepTimer(args.warmup, args.steps, device, memory, turnstile, method.name)
    steps = args.warmup + args.steps + (1 if memory else 0)
    build, shape, _ = MODELS[args.model]
    torch.manual_seed(0)
    net = build(args.width)
    callbacks = ([MultiMix(seed=0, **method.callback)] if method.callback else []) + [timer]
    trainer = L.Trainer(accelerator=device.type, devices=1, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(BenchModule(net, method.transform),
                DataLoader(batches(shape, args.batch_size, steps), batch_size=args.batch_size))
    return timer


def trainer_table(methods: Sequence[Method], args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """``--repeats`` rounds of every method's fit in its own thread, stepping in turns; a row per method."""
    times: dict[str, list[list[float]]] = {m.name: [] for m in methods}
    peaks: dict[str, list[int]] = {m.name: [] for m in methods}
    for repeat in range(args.repeats):
        order = methods[repeat % len(methods):] + methods[:repeat % len(methods)]
        turnstile = Turnstile([m.name for m in order], seed=repeat)

        def work(method: Method) -> StepTimer:
            try:
                return fit(method, args, device, repeat == 0, turnstile)
            finally:  # a failed fit too: the others go on without it
                turnstile.leave(method.name)

        with ThreadPoolExecutor(len(order), thread_name_prefix="fit") as pool:
            for method, timer in zip(order, pool.map(work, order)):
                times[method.name].append(timer.times_ms)
                peaks[method.name] += timer.peak_bytes
    rows = []
    for method in methods:
        pairs = [(a, b) for mine, ref in zip(times[method.name], times["none"]) for a, b in zip(mine, ref)]
        ratios = [a / b for a, b in pairs]
        low, high = median_ci(ratios)
        ratio, target = median(ratios), TARGETS.get((args.model, method.name))
        rows.append({"method": method.name, "ms": median([t for run in times[method.name] for t in run]),
                     "extra_ms": median([a - b for a, b in pairs]), "ratio": ratio, "low": low, "high": high,
                     "target": target, "met": "" if target is None else ("n/a (quick)" if args.quick else
                                                                         ("yes" if ratio <= target else "NO")),
                     "extra_mb": (median(peaks[method.name]) - median(peaks["none"])) / MB
                     if peaks[method.name] and peaks["none"] else float("nan")})
    return rows


def core_table(methods: Sequence[Method], args: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    """Median ms of each stage of each method's core on one forward's tensors (see the module docstring)."""
    build, shape, _ = MODELS[args.model]
    torch.manual_seed(0)
    net = build(args.width).to(device)
    x, labels = (t.to(device) for t in batches(shape, args.batch_size, 1).tensors)
    with torch.no_grad():
        hook = net.pool.register_forward_hook(lambda m, a, o: setattr(m, "seen", a[0].detach()))
        pooled = net.embed(x)
        hook.remove()
    feature_map = net.pool.seen  # (m, d, h, w); dense mode reads it as its (m, r, d) view, as in the step
    distiller = Distiller(SelfDistillation(warmup_steps=0))  # the teacher as the callback builds and runs it
    distiller.attach(net, device)
    distiller.watch("fc")
    generator = torch.Generator(device=device)
    out: dict[str, dict[str, float]] = {}

    def stages(options: dict[str, Any]) -> dict[str, Callable[[], Any]]:
        logits = net.fc(pooled).detach().requires_grad_(True)
        map_leaf = feature_map.clone().requires_grad_(True)
        state: dict[str, Any] = {"step": 0}

        def sample() -> None:
            if options.get("probability", 0.5) == 0.0:  # input mixup: the draw and the mixing of the images
                mixer = InputMixer(1.0, generator)
                state["mixed"], state["draw"] = mixer(x), mixer.draw
            elif options.get("mode") == "pairs":
                state["w"] = pair_weights(labels.shape[0], 1.0, generator=generator, device=device)
            else:
                state["w"] = dirichlet_weights(labels.shape[0], options.get("n_tuples", 1000), 1.0,
                                               generator=generator, device=device)

        def teacher() -> None:
            state["step"] += 1
            state["teacher"] = distiller.outputs("", (x,), {}, global_step=state["step"], with_embeddings=False)
            distiller.update(net, global_step=state["step"], world_size=1)

        def objective() -> None:
            if "draw" in state:
                state["loss"] = mixup_objective(logits, labels, *state["draw"])
            elif options.get("dense") is not None:
                state["loss"] = multimix_objective(state["w"], labels, head=net.fc,
                                                   feature_map=map_leaf.flatten(2).transpose(1, 2))
            else:
                state["loss"] = multimix_objective(state["w"], labels, logits=logits, teacher=state.get("teacher"))

        def backward() -> None:
            state.pop("loss").backward()
            logits.grad = map_leaf.grad = None  # a fresh gradient each time, as in the step

        return {"sample": sample, **({"teacher": teacher} if options.get("distill") else {}), "objective": objective,
                "backward": backward}

    now = clock(device)
    warmup, repeats = (1, 2) if args.quick else (3, 30)  # untimed and timed calls of every stage
    for method in methods:
        if not method.callback:
            continue
        calls = stages(method.callback)
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for repeat in range(warmup + repeats):
            for name, fn in calls.items():
                synchronize(device)
                started = now()
                fn()
                synchronize(device)
                if repeat >= warmup:
                    samples[name].append((now() - started) / 1e6)
        out[method.name] = {name: median(values) for name, values in samples.items()}
        out[method.name]["total"] = sum(out[method.name].values())
    distiller.detach()
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--model", default="smallcnn", choices=list(MODELS))
    parser.add_argument("--methods", default=",".join(m.name for m in METHODS), help="comma-separated, with none")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=None, help="the model's width (default: its own)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every fit")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per fit")
    parser.add_argument("--repeats", type=int, default=3, help="fits per method (methods interleaved)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    parser.add_argument("--out", default=str(OUT_DIR), help="output folder (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="smoke run: a tiny model, a few steps")
    args = parser.parse_args(argv)
    unknown = set(args.methods.split(",")) - {m.name for m in METHODS}
    if unknown or "none" not in args.methods.split(","):
        parser.error(f"--methods must include 'none'; unknown: {sorted(unknown)}")
    if args.quick:
        args.width, args.warmup, args.steps, args.repeats = 8, 1, 2, 1
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if argv is None:
        reexec_with_stable_malloc(args.device)
    quiet()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch.cuda.is_available() is False")
    if device.type == "cpu":
        torch.set_num_threads(1)  # the thread CPU time clock needs one thread
    methods = [m for m in METHODS if m.name in args.methods.split(",")]
    info = machine_info(str(device))
    print_machine(info)
    settings = (f"{args.model} (width {args.width or 'default'}), batch {args.batch_size}, {args.warmup} warm-up + "
                f"{args.steps} timed steps x {args.repeats} fits per method, precision 32-true, clock "
                f"{'wall' if device.type == 'cuda' else 'thread CPU time'}")
    print("settings: " + settings, flush=True)
    started = time.perf_counter()
    rows = trainer_table(methods, args, device)
    core = core_table(methods, args, device)
    positions = MODELS[args.model][2]
    table = [[r["method"] + (f" (r = {positions})" if r["method"].startswith("dense") else ""), f"{r['ms']:.1f}",
              f"{r['extra_ms']:+.2f}", f"{r['ratio']:.3f} ({r['low']:.3f}-{r['high']:.3f})",
              "" if r["target"] is None else f"<= {r['target']:.2f}: {r['met']}",
              f"{core[r['method']]['total']:.2f}" if r["method"] in core else "", f"{r['extra_mb']:.2f}"]
             for r in rows]
    headers = ("method", "ms/step", "extra ms", "ratio to none (95% CI)", "target", "core ms", "extra MB")
    stage_names = ("sample", "teacher", "objective", "backward")
    extra = {r["method"]: r["extra_ms"] for r in rows}
    core_rows = [[name, *(f"{stages[s]:.3f}" if s in stages else "" for s in stage_names), f"{stages['total']:.3f}",
                  f"{extra[name] - stages['total']:+.2f}"] for name, stages in core.items()]
    report = (format_table(headers, table, title=f"== Trainer step, {args.model}, b={args.batch_size}, {device} ==")
              + "\n\n" + format_table(("method", *stage_names, "core total", "callback's own"), core_rows,
                                      title="== Where the time goes (ms, medians): the core alone, and the rest =="))
    print("\n" + report + f"\n\ntotal time: {time.perf_counter() - started:.0f} s")
    stem = f"overhead_{args.model}_{device.type}"
    write_report(args.out, f"{stem}.md", info, settings, report)
    keys = ("method", "ms", "extra_ms", "ratio", "low", "high", "target", "met", "extra_mb")
    write_csv(Path(args.out, f"{stem}.csv"), keys, [[r[k] for k in keys] for r in rows], results_header(info, settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
