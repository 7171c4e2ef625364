"""Where does the callback's time go inside a real training step, not in a loop?

What is measured
----------------
One ``Trainer.fit`` per method of ``benchmarks/overhead.py`` (the same module, model, batches and options), with the
package's functions wrapped by thread-CPU-time timers: the step MultiMix stands in for, the user's own
``training_step`` inside it, and each stage of the callback's work (the coin, input mixing, the draw of the weights,
the objective and its parts, what follows the step: ``MultiMix._record_step``, the health flag and the loss log). A
stage's time in a step is the sum over its calls in that step; the table gives the median over the timed steps, in
microseconds. The backward pass is not split: the objective's gradient runs inside the network's.

Why: the same functions can cost several times more inside a step than in a loop (``overhead.py``'s core table),
because a training step leaves caches, branch predictors and the allocator's free lists full of the network's work:
the first call after it, or a new 512 KB buffer, pays for that. This table says where the callback pays, so changes
can be judged where they matter; ``overhead.py`` says what the step costs in all.

How to read the output
----------------------
Indented rows are parts of the row above them (each timer adds about a microsecond, and more when cold, to the
rows around it). ``callback's part`` is the whole step less the user's ``training_step``: what the callback adds
before the backward pass. An empty cell: the method does not run that stage; a stage that runs on some steps only
(``protocol-1000``: MultiMix on about half) is the median over the steps that ran it.

Example::

    python benchmarks/step_profile.py            # small CNN, b = 128, one CPU thread
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import lightning as L
import torch

import lightning_multimix.callback as callback_module
import lightning_multimix.capture as capture_module
import lightning_multimix.objective as objective_module
import lightning_multimix.step as step_module
from benchmarks._harness import RESULTS_DIR, format_table, machine_info, median, print_machine, quiet, write_report
from benchmarks._timing import reexec_with_stable_malloc
from benchmarks.overhead import METHODS, MODELS, BenchModule, fit_method

#: (row label, owner, attribute): what is timed, outermost first; indentation shows what is part of what
STAGES: tuple[tuple[str, Any, str], ...] = (
    ("the step MultiMix stands in for", step_module.TrainingStep, "__call__"),
    ("  your training_step", BenchModule, "training_step"),
    ("  the coin: MultiMix or not", step_module.TrainingStep, "kind"),
    ("  input mixing", step_module.TrainingStep, "_mix_batch"),
    ("  captures armed", capture_module.StepCapture, "__enter__"),
    ("  the loss", step_module.TrainingStep, "_loss"),
    ("    the draw of the weights", callback_module.MultiMix, "sample_weights"),
    ("      Dirichlet weights", callback_module, "dirichlet_weights"),
    ("      pair weights", callback_module, "pair_weights"),
    ("    MultiMix objective", step_module, "multimix_objective"),
    ("      dense: per-example targets", objective_module, "_targets"),
    ("      mixed embeddings (head re-run)", objective_module, "interpolate"),
    ("      dense: head at every position", objective_module, "position_linear"),
    ("      dense: loss", objective_module, "factorised_dense_logit_loss"),
    ("    input-mixup objective", step_module, "mixup_objective"),
    ("  after the step: health, log", callback_module.MultiMix, "_record_step"),
)
DEFAULT_METHODS = "input-mixup,multimix-1000,multimix-10000,protocol-1000,dense-1000"


class StageTimes(L.Callback):
    """Per-step sums of every stage's calls; the steps from ``warmup`` on are kept."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.step = warmup, 0
        self.current: dict[str, float] = defaultdict(float)
        self.kept: dict[str, list[float]] = defaultdict(list)

    def add(self, label: str, microseconds: float) -> None:
        self.current[label] += microseconds

    def on_train_batch_start(self, *args: Any) -> None:
        self.current = defaultdict(float)

    def on_train_batch_end(self, *args: Any) -> None:
        if self.step >= self.warmup:
            for label, total in self.current.items():
                self.kept[label].append(total)
        self.step += 1


def timed(function: Callable, label: str, sink: Callable[[], Optional[StageTimes]]) -> Callable:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time_ns()
        try:
            return function(*args, **kwargs)
        finally:
            times = sink()
            if times is not None:
                times.add(label, (time.thread_time_ns() - start) / 1e3)
    return wrapper


def profile(method_name: str, args: argparse.Namespace, active: list) -> dict[str, float]:
    method = next(m for m in METHODS if m.name == method_name)
    times = StageTimes(args.warmup)
    active[0] = times
    fit_method(method, args.model, None, 128, "32-true", torch.device("cpu"), args.warmup + args.steps, [times])
    active[0] = None
    found = {label: median(values) for label, values in times.kept.items()}
    whole, own = times.kept.get(STAGES[0][0]), times.kept.get(STAGES[1][0])
    if whole and own:
        found["callback's part"] = median([a - b for a, b in zip(whole, own)])
    return found


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smallcnn", choices=list(MODELS))
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="callback methods of benchmarks/overhead.py")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    names = args.methods.split(",")
    callback_methods = {m.name for m in METHODS if m.callback}
    if not set(names) <= callback_methods:
        parser.error(f"--methods: {sorted(set(names) - callback_methods)} run no callback; choose among "
                     f"{sorted(callback_methods)}")
    if argv is None:
        reexec_with_stable_malloc("cpu")
    quiet()
    torch.set_num_threads(1)
    info = machine_info("cpu")
    print_machine(info)
    active: list = [None]
    missing = []
    for label, owner, attribute in STAGES:
        if hasattr(owner, attribute):  # a stage another version of the package does not have is left out (said)
            setattr(owner, attribute, timed(getattr(owner, attribute), label, lambda: active[0]))
        else:
            missing.append(f"{getattr(owner, '__name__', owner)}.{attribute}")
    if missing:
        print("stages this version of the package does not have, left out: " + ", ".join(missing))
    columns = {name: profile(name, args, active) for name in names}
    labels = [label for label, _, _ in STAGES] + ["callback's part"]
    width = max(map(len, labels))  # left-aligned labels keep their indentation
    rows = [[label.ljust(width), *(f"{columns[name][label]:.0f}" if label in columns[name] else "" for name in names)]
            for label in labels if any(label in columns[name] for name in names)]
    table = format_table(("stage (us per step, medians)", *names), rows,
                         title=f"== inside the training step, {args.model}, b=128, cpu, one thread ==")
    print(table)
    settings = f"{args.model}, batch 128, {args.warmup} warm-up + {args.steps} timed steps per method, thread CPU time"
    write_report(args.out, f"step_profile_{args.model}_cpu.md", info, settings, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
