"""What does MultiMix add to a training step? Step time and memory of every method against no mixing.

What is measured
----------------
One training step (forward, loss, backward, optimizer step, the callbacks' ``on_train_batch_end``) of the same model
on the same batches through a real ``lightning.Trainer``, for every method, interleaved step by step
(:mod:`benchmarks._timing`): ``none`` (cross-entropy), ``mixup`` / ``cutmix`` (torchvision's ``v2.MixUp`` /
``v2.CutMix`` in ``training_step``), and the callback's ``input-mixup`` (``MultiMix(probability=0)``: every batch
mixed in input space, the protocol's other batches), ``pairs``, ``multimix-N`` (``MultiMix(n_tuples=N,
probability=1)``), ``protocol-1000`` (``MultiMix()``, the defaults: half MultiMix, half input mixup), ``dense-N``
(Dense MultiMix, ``r`` positions: 7x7 = 49 on the small CNN) and ``distill-1000`` (with the EMA teacher).
``input-mixup-in-step`` and ``multimix-1000-in-step`` call the package's functions (the draw and the objective) in
the module's own ``training_step``, without the callback: the least any callback doing the same work can cost, so
the difference to the callback's row is what the callback itself adds.

How to read the tables
----------------------
* Trainer table: ``ms/step`` median; ``ratio`` the median of step-by-step ratios to ``none`` with a bootstrap 95%
  interval, checked against the target where there is one; ``extra ms`` the median step-by-step difference, which
  does not depend on the network (it transfers to a larger network with the same head); ``extra MB`` the step's peak
  memory above ``none``'s (CPU: live tensor bytes during one untimed step; CUDA: ``max_memory_allocated``).
* Core table, where the time goes: the package's functions alone on the tensors one forward produced: ``sample``
  (the weights, or the input-mixup draw and mixing), ``objective`` (interpolation and loss), ``backward`` (from the
  loss to the logits or feature map), ``teacher`` (its forward and EMA update). The callback's own cost (hooks,
  checks, health flag, logging) is the Trainer table's ``extra ms`` minus the core total.

On CPU the clock is the thread's CPU time with one intra-op thread (``--threads 1``), and the script restarts itself
with glibc malloc settings that keep freed memory (``benchmarks._timing.STABLE_MALLOC_ENV``). ``--device cuda`` runs
the same tables on a GPU (wall clock, device synchronised).

Files written into ``--out`` (default ``benchmarks/results``): ``overhead_<model>_<device>.md`` (command, date,
machine, both tables) and ``.csv`` (the Trainer table).

Examples::

    python benchmarks/overhead.py --quick --out /tmp/overhead           # CI smoke run, tiny model, seconds
    python benchmarks/overhead.py                                       # the README's table (small CNN, CPU)
    python benchmarks/overhead.py --model preactresnet18 --device cuda  # the paper's network on a GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._harness import (
    RESULTS_DIR,
    format_table,
    machine_info,
    print_machine,
    quiet,
    results_header,
    write_csv,
)
from benchmarks._timing import (
    StepTimer,
    median,
    median_ci,
    reexec_with_stable_malloc,
    run_interleaved,
    set_clock,
    synchronize,
)
from lightning_multimix import Dense, MultiMix, SelfDistillation
from lightning_multimix.batch import InputMixer
from lightning_multimix.demo.models import PreActResNet18, SmallCNN
from lightning_multimix.interpolation import mix_with_partner
from lightning_multimix.objective import TeacherOutputs, mixup_objective, multimix_objective
from lightning_multimix.sampling import dirichlet_weights, mixup_pairing, pair_weights
from lightning_multimix.teacher import Distiller

NUM_CLASSES, MB = 10, 2.0**20


@dataclass(frozen=True)
class Method:
    name: str
    callback: dict[str, Any] = field(default_factory=dict)  # MultiMix's arguments; empty: no callback
    # in training_step: torchvision's "mixup" / "cutmix", or the package's functions called there ("input-mixup",
    # "multimix-1000"), the least any callback doing the same work can cost
    transform: Optional[str] = None


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
#: the targets of the performance issue, (model, method) -> ratio to ``none``
TARGETS = {("smallcnn", "multimix-1000"): 1.01, ("smallcnn", "multimix-10000"): 1.05,
           ("smallcnn", "dense-1000"): 1.10, ("smallcnn", "distill-1000"): 1.36, ("smallcnn", "input-mixup"): 1.01,
           ("preactresnet18", "multimix-1000"): 1.02}
MODELS: dict[str, tuple[Callable[[Optional[int]], nn.Module], tuple[int, int, int]]] = {
    "smallcnn": (lambda w: SmallCNN(NUM_CLASSES, 1, **({"width": w} if w else {})), (1, 28, 28)),
    "preactresnet18": (lambda w: PreActResNet18(NUM_CLASSES, 3, **({"width": w} if w else {})), (3, 32, 32)),
}


class BenchModule(L.LightningModule):
    """A typical classification module: cross-entropy on the (optionally input-mixed) batch, logged every step; or,
    with ``transform="input-mixup"`` / ``"multimix-1000"``, the package's objective computed in the step itself
    (``mixup_pairing`` and ``mixup_objective``; ``dirichlet_weights`` and ``multimix_objective`` in logit space)."""

    def __init__(self, net: nn.Module, transform: Optional[str]) -> None:
        super().__init__()
        self.net = net
        self.transform: Optional[Callable[..., Any]] = None
        self.in_step = transform if transform in ("input-mixup", "multimix-1000") else None
        self.generator: Optional[torch.Generator] = None
        if transform in ("mixup", "cutmix"):
            from torchvision.transforms import v2

            self.transform = (v2.MixUp if transform == "mixup" else v2.CutMix)(alpha=1.0, num_classes=NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.in_step is not None:
            loss = self._package_objective(x, y)
        else:
            target: Tensor = y
            if self.transform is not None:
                x, target = self.transform(x, y)
            loss = F.cross_entropy(self(x), target)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, batch_size=y.shape[0])
        return loss

    def _package_objective(self, x: Tensor, y: Tensor) -> Tensor:
        if self.generator is None:
            self.generator = torch.Generator(device=self.device).manual_seed(0)
        if self.in_step == "input-mixup":
            lam, partner = mixup_pairing(y.shape[0], 1.0, generator=self.generator, device=self.device)
            return mixup_objective(self(mix_with_partner(x, lam, partner)), y, lam, partner)
        weights = dirichlet_weights(y.shape[0], 1000, 1.0, generator=self.generator, device=self.device)
        return multimix_objective(weights, y, logits=self(x))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def batches(shape: tuple[int, int, int], batch_size: int, count: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(count * batch_size, *shape, generator=g),
                         torch.randint(0, NUM_CLASSES, (count * batch_size,), generator=g))


# ---------------------------------------------------------------------------------------------------- Trainer table


def fit_method(method: Method, model: str, width: Optional[int], batch_size: int, precision: str,
               device: torch.device, steps: int, callbacks: Sequence[L.Callback]) -> None:
    """One ``Trainer.fit`` of ``steps`` steps of ``method`` (its ``MultiMix`` first, then ``callbacks``)."""
    build, shape = MODELS[model]
    torch.manual_seed(0)
    net = build(width)
    callbacks = ([MultiMix(seed=0, **method.callback)] if method.callback else []) + list(callbacks)
    trainer = L.Trainer(accelerator=device.type, devices=1, max_steps=steps, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks)
    data = DataLoader(batches(shape, batch_size, steps), batch_size=batch_size)
    trainer.fit(BenchModule(net, method.transform), data)


def fit(method: Method, args: argparse.Namespace, device: torch.device, memory: bool, turnstile: Any) -> StepTimer:
    timer = StepTimer(args.warmup, args.steps, device, memory, turnstile, method.name)
    fit_method(method, args.model, args.width, args.batch_size, args.precision, device,
               args.warmup + args.steps + (1 if memory else 0), [timer])
    return timer


def trainer_table(methods: Sequence[Method], args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    times: dict[str, list[list[float]]] = {m.name: [] for m in methods}
    peaks: dict[str, list[int]] = {m.name: [] for m in methods}
    for repeat in range(args.repeats):
        order = methods[repeat % len(methods):] + methods[:repeat % len(methods)]
        timers = run_interleaved({m.name: (lambda t, m=m: fit(m, args, device, repeat == 0, t)) for m in order},
                                 seed=repeat)
        for name, timer in timers.items():
            times[name].append(timer.times_ms)
            peaks[name] += timer.peak_bytes
    base = times["none"]
    rows = []
    for method in methods:
        ratios = [a / b for mine, ref in zip(times[method.name], base) for a, b in zip(mine, ref)]
        extra = [a - b for mine, ref in zip(times[method.name], base) for a, b in zip(mine, ref)]
        low, high = median_ci(ratios)
        target = TARGETS.get((args.model, method.name))
        ratio = median(ratios)
        rows.append({"method": method.name, "ms": median([t for run in times[method.name] for t in run]),
                     "extra_ms": median(extra), "ratio": ratio, "low": low, "high": high, "target": target,
                     "met": "" if target is None else ("n/a (quick)" if args.quick else
                                                       ("yes" if ratio <= target else "NO")),
                     "extra_mb": (median(peaks[method.name]) - median(peaks["none"])) / MB
                     if peaks[method.name] and peaks["none"] else float("nan")})
    return rows


# ---------------------------------------------------------------------------------------------------- the core alone


def core_table(methods: Sequence[Method], args: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    """Median ms of each stage of each method's core on one forward's tensors (see the module docstring)."""
    build, shape = MODELS[args.model]
    torch.manual_seed(0)
    net = build(args.width).to(device)
    x, labels = (t.to(device) for t in batches(shape, args.batch_size, 1).tensors)
    features = net.features(x) if hasattr(net, "features") else None
    with torch.no_grad():
        pooled = net.embed(x)
        raw_map = net.pool.register_forward_hook(lambda m, a, o: setattr(m, "seen", a[0].detach()))
        net(x)
        raw_map.remove()
    feature_map = net.pool.seen  # (m, d, 7, 7); dense mode reads it as its (m, r, d) view, as in the step
    del features
    distiller = Distiller(SelfDistillation())  # the teacher as the package builds it (channels-last on CPU)
    distiller.attach(net, device)
    teacher = distiller.teacher
    generator = torch.Generator(device=device)
    out: dict[str, dict[str, list[float]]] = {}

    def stages(method: Method) -> dict[str, Callable[[], Any]]:
        options = method.callback
        n = options.get("n_tuples", 1000)
        logits = net.fc(pooled).detach().requires_grad_(True)
        feature_map_leaf = feature_map.clone().requires_grad_(True)
        state: dict[str, Any] = {}

        def sample() -> None:
            if options.get("probability", 0.5) == 0.0:  # input mixup: the draw and the mixing of the images
                mixer = InputMixer(1.0, generator)
                state["mixed"] = mixer(x)
                state["draw"] = mixer.draw
            elif options.get("mode") == "pairs":
                state["w"] = pair_weights(labels.shape[0], 1.0, generator=generator, device=device)
            else:
                state["w"] = dirichlet_weights(labels.shape[0], n, 1.0, generator=generator, device=device)

        def teacher_step() -> None:
            with torch.no_grad():
                state["teacher"] = TeacherOutputs(logits=teacher.module(x), weight=0.5)
            teacher.update(net)

        def objective() -> None:
            if "draw" in state:
                state["loss"] = mixup_objective(logits, labels, *state["draw"])
            elif options.get("dense") is not None:
                state["loss"] = multimix_objective(state["w"], labels, head=net.fc,
                                                   feature_map=feature_map_leaf.flatten(2).transpose(1, 2))
            else:
                state["loss"] = multimix_objective(state["w"], labels, logits=logits, teacher=state.get("teacher"))

        def backward() -> None:
            state.pop("loss").backward()
            # as in the step, where these gradients go on into the network: a fresh gradient each time, not one
            # accumulated in place into a leaf (an extra pass over the feature map's size in dense mode)
            logits.grad = feature_map_leaf.grad = None

        calls = {"sample": sample, "objective": objective, "backward": backward}
        return {"teacher": teacher_step, **calls} if options.get("distill") else calls

    for method in methods:
        if not method.callback:
            continue
        calls = stages(method)
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for repeat in range(args.core_warmup + args.core_repeats):
            for name, fn in calls.items():
                synchronize(device)
                started = time.perf_counter_ns() if device.type == "cuda" else time.thread_time_ns()
                fn()
                synchronize(device)
                ended = time.perf_counter_ns() if device.type == "cuda" else time.thread_time_ns()
                if repeat >= args.core_warmup:
                    samples[name].append((ended - started) / 1e6)
        out[method.name] = {name: median(values) for name, values in samples.items()}
        out[method.name]["total"] = sum(out[method.name].values())
    return out


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="smallcnn", choices=list(MODELS))
    parser.add_argument("--methods", default=",".join(m.name for m in METHODS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=None, help="the model's width (default: its own)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every fit")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per fit")
    parser.add_argument("--repeats", type=int, default=3, help="fits per method (methods interleaved)")
    parser.add_argument("--core-repeats", type=int, default=30)
    parser.add_argument("--core-warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (the CPU clock needs 1)")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.add_argument("--quick", action="store_true", help="CI smoke run: a tiny model, a few steps")
    args = parser.parse_args(argv)
    unknown = set(args.methods.split(",")) - {m.name for m in METHODS}
    if unknown or "none" not in args.methods.split(","):
        parser.error(f"--methods must include 'none'; unknown: {sorted(unknown)}")
    if args.quick:
        args.width, args.warmup, args.steps, args.repeats, args.core_repeats, args.core_warmup = 8, 1, 2, 1, 2, 1
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
        torch.set_num_threads(max(1, args.threads))
    set_clock("cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall")
    methods = [m for m in METHODS if m.name in args.methods.split(",")]
    info = machine_info(str(device))
    print_machine(info)
    settings = (f"{args.model} (width {args.width or 'default'}), batch {args.batch_size}, {args.warmup} warm-up + "
                f"{args.steps} timed steps x {args.repeats} fits per method, precision {args.precision}, clock "
                f"{'thread CPU time' if device.type == 'cpu' and torch.get_num_threads() == 1 else 'wall'}")
    print("settings: " + settings, flush=True)
    started = time.perf_counter()
    rows = trainer_table(methods, args, device)
    core = core_table(methods, args, device)
    positions = {"smallcnn": 49, "preactresnet18": 16}[args.model]
    table = [[r["method"] + (f" (r = {positions})" if r["method"].startswith("dense") else ""), f"{r['ms']:.1f}",
              f"{r['extra_ms']:+.2f}", f"{r['ratio']:.3f} ({r['low']:.3f}-{r['high']:.3f})",
              "" if r["target"] is None else f"<= {r['target']:.2f}: {r['met']}",
              f"{core[r['method']]['total']:.2f}" if r["method"] in core else "", f"{r['extra_mb']:.2f}"]
             for r in rows]
    headers = ("method", "ms/step", "extra ms", "ratio to none (95% CI)", "target", "core ms", "extra MB")
    stage_names = ("sample", "teacher", "objective", "backward")
    core_rows = [[name, *(f"{stages[s]:.3f}" if s in stages else "" for s in stage_names), f"{stages['total']:.3f}",
                  f"{next(r['extra_ms'] for r in rows if r['method'] == name) - stages['total']:+.2f}"]
                 for name, stages in core.items()]
    report = (format_table(headers, table, title=f"== Trainer step, {args.model}, b={args.batch_size}, {device} ==")
              + "\n\n" + format_table(("method", *stage_names, "core total", "callback's own"), core_rows,
                                      title="== Where the time goes (ms, medians): the core alone, and the rest =="))
    print("\n" + report + f"\n\ntotal time: {time.perf_counter() - started:.0f} s")
    if args.out and not args.quick or args.out and "--out" in sys.argv:
        out = Path(args.out)
        stem = f"overhead_{args.model}_{device.type}"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.md").write_text(results_header(info, settings) + "\n```\n" + report + "\n```\n")
        write_csv(out / f"{stem}.csv", ["method", "ms", "extra_ms", "ratio", "low", "high", "target", "met",
                                        "extra_mb"], [[r[k] for k in ("method", "ms", "extra_ms", "ratio", "low",
                                                                      "high", "target", "met", "extra_mb")]
                                                      for r in rows], preamble=results_header(info, settings))
        print(f"wrote {out / (stem + '.md')}, {out / (stem + '.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
