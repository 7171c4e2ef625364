"""What host work does each method add to a training step? Operations dispatched and Python calls, counted exactly.

Nothing is timed. Each method is fitted through a real ``Trainer`` on CPU (batch 128, random batches) for ``S`` and
``2S`` steps; a count per step is the difference over ``S``, so what is done once cancels. Counted: the operations
reaching a ``TorchDispatchMode``, by name (on a GPU each is a kernel launch or more; ``host reads``,
``aten::_local_scalar_dense``, are synchronisations there), and, in a separate fit, the Python calls
(``sys.setprofile``) by the called function's file: ``package``, ``lightning`` or ``other``. Models: a tiny ``mlp``
and, for dense and CutMix, a tiny ``cnn``, each with its own ``none``; ``Callback()`` does nothing; ``tv-*`` is
torchvision's transform in the step. Last, the objective's top-level operations eager and ``torch.compile``d.
File in ``--out``: ``step_cost_tiny_cpu.md``.

Examples::

    python benchmarks/step_cost.py            # every method, S = 100: the published table (2-4 minutes)
    python benchmarks/step_cost.py --quick    # smoke run: five methods, S = 5, seconds
"""

import functools
import gc
import importlib.util
import os
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

from benchmarks._harness import OUT_DIR, format_table, machine_info, print_machine, quiet, script_parser, write_report
from benchmarks.overhead import NUM_CLASSES, BenchModule, batches
from lightning_multimix import Dense, MultiMix, SelfDistillation, multimix_objective

BATCH, INPUT_SHAPES = 128, {"mlp": (16,), "cnn": (3, 8, 8)}
HOST_READ, DETACH = "aten::_local_scalar_dense", "aten::detach"
#: the methods whose added operations are listed by name
TOP_OPS_FOR = ("MultiMix()", "input-mixup")


@dataclass(frozen=True)
class Method:
    name: str
    model: str  # "mlp" or "cnn"; compared with the "none" of the same model
    callback: Optional[dict[str, Any]] = None  # MultiMix's arguments; None: no callback
    transform: Optional[str] = None  # torchvision's "mixup" / "cutmix" in the module's training_step


METHODS: tuple[Method, ...] = (
    Method("none", "mlp"),
    Method("Callback()", "mlp"),  # a Callback that does nothing: what Lightning costs for any callback
    Method("MultiMix()", "mlp", {}),
    Method("multimix-1000", "mlp", {"n_tuples": 1000, "probability": 1.0}),
    Method("multimix-10000", "mlp", {"n_tuples": 10000, "probability": 1.0}),
    Method("input-mixup", "mlp", {"probability": 0.0}),
    Method("pairs", "mlp", {"mode": "pairs", "probability": 1.0}),
    Method("distill-1000", "mlp", {"n_tuples": 1000, "probability": 1.0, "distill": SelfDistillation()}),
    Method("tv-mixup", "mlp", transform="mixup"),
    Method("none", "cnn"),
    Method("dense-1000", "cnn", {"n_tuples": 1000, "probability": 1.0, "dense": Dense()}),
    Method("tv-cutmix", "cnn", transform="cutmix"),
    # (b, c) targets: one-hot probabilities with the cross-entropy, multi-hot with BCE; each against its own none
    *(Method(name, model, callback) for model in ("mlp-probs", "mlp-bce") for name, callback in
      (("none", None), ("MultiMix()", {}), ("multimix-1000", {"n_tuples": 1000, "probability": 1.0}),
       ("input-mixup", {"probability": 0.0}))),
)
QUICK_METHODS = ("none/mlp", "Callback()/mlp", "MultiMix()/mlp", "input-mixup/mlp", "tv-mixup/mlp")


def key(method: Method) -> str:
    return f"{method.name}/{method.model}"


class BCEModule(BenchModule):
    """``BenchModule`` trained with BCE with logits on multi-hot targets."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = F.binary_cross_entropy_with_logits(self(batch[0]), batch[1])
        self.log("train/loss", loss, on_step=True)
        return loss


def build_net(model: str) -> nn.Module:
    if model.startswith("mlp"):
        return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, NUM_CLASSES))
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, NUM_CLASSES))


class OpCounter(TorchDispatchMode):
    """Counts every operator call dispatched while active, by ``namespace::name`` (overloads together)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        self.counts[f"{func.namespace}::{func.overloadpacket.__name__}"] += 1
        return func(*args, **(kwargs or {}))


class CallCounter:
    """Counts the Python function calls while active, by where the called function lives."""

    ROOTS = (("package", importlib.util.find_spec("lightning_multimix").submodule_search_locations[0] + os.sep),
             ("lightning", os.path.dirname(L.__file__) + os.sep))

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def place(filename: str) -> str:
        absolute = os.path.abspath(filename)
        return next((name for name, root in CallCounter.ROOTS if absolute.startswith(root)), "other")

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            self.counts[self.place(frame.f_code.co_filename)] += 1

    def __enter__(self) -> "CallCounter":
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc: Any) -> None:
        sys.setprofile(None)


def counted_fit(method: Method, steps: int, counter: str) -> Counter[str]:
    """The counts of one ``Trainer.fit`` of ``steps`` steps of ``method`` (``counter``: ``"ops"`` or ``"calls"``)."""
    torch.manual_seed(0)
    net = build_net(method.model)
    x, y = batches(INPUT_SHAPES[method.model.split("-")[0]], BATCH, steps).tensors
    if method.model == "mlp-probs":
        y = F.one_hot(y, NUM_CLASSES).float()
    elif method.model == "mlp-bce":
        y = (torch.rand(y.shape[0], NUM_CLASSES, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    callbacks = [MultiMix(seed=0, **method.callback)] if method.callback is not None else []
    callbacks += [L.Callback()] if method.name == "Callback()" else []
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=callbacks)
    module = (BCEModule if method.model == "mlp-bce" else BenchModule)(net, method.transform)
    data = DataLoader(list(zip(x.split(BATCH), y.split(BATCH))), batch_size=None)  # as they are: no collation ops
    active: Any = OpCounter() if counter == "ops" else CallCounter()
    gc.collect()
    gc.disable()
    try:
        with active:
            trainer.fit(module, data)
    finally:
        gc.enable()
    return active.counts


def per_step(method: Method, steps: int, counter: str) -> dict[str, float]:
    """Counts per step: ``(count of a 2S-step fit - count of an S-step fit) / S``, by name."""
    short, long = counted_fit(method, steps, counter), counted_fit(method, 2 * steps, counter)
    return {name: (long[name] - short[name]) / steps for name in set(short) | set(long)
            if long[name] != short[name]}


def objective_ops(compiled: bool) -> int:
    """Top-level aten operations (profiled) of a forward and backward of ``multimix_objective``, eager or compiled."""
    from torch.profiler import ProfilerActivity, profile

    objective = torch.compile(multimix_objective) if compiled else multimix_objective
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(BATCH, NUM_CLASSES, generator=g, requires_grad=True)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)
    weights = torch.distributions.Dirichlet(torch.ones(BATCH)).sample((1000,)).T

    objective(weights, labels, logits=logits).backward()  # compiles
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        objective(weights, labels, logits=logits).backward()
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def number(value: float) -> str:
    """An integer as one; otherwise two decimals (an average over steps that differ)."""
    value = round(value, 2) + 0.0
    return str(int(value)) if value == int(value) else f"{value:.2f}"


def measure(methods: Sequence[Method], steps: int) -> dict[str, dict[str, dict[str, float]]]:
    found = {}
    for method in methods:
        found[key(method)] = {"ops": per_step(method, steps, "ops"), "calls": per_step(method, steps, "calls")}
        ops, calls = found[key(method)]["ops"], found[key(method)]["calls"]
        print(f"{key(method)}: {number(sum(ops.values()))} ops/step, {number(sum(calls.values()))} Python calls/step",
              flush=True)
    return found


def report(methods: Sequence[Method], found: dict[str, dict[str, dict[str, float]]], steps: int) -> str:
    def extra(method: Method, counter: str, name: Optional[str] = None) -> float:
        mine, base = found[key(method)][counter], found[f"none/{method.model}"][counter]
        if name is None:
            return sum(mine.values()) - sum(base.values())
        return mine.get(name, 0.0) - base.get(name, 0.0)

    headers = ("method", "model", "ops/step", "extra ops", "extra host reads", "extra detach", "extra calls: package",
               "lightning", "package+lightning", "other", "calls/step")
    rows = []
    for method in methods:
        ops, calls = found[key(method)]["ops"], found[key(method)]["calls"]
        package, lightning = extra(method, "calls", "package"), extra(method, "calls", "lightning")
        rows.append([method.name, method.model, number(sum(ops.values())), number(extra(method, "ops")),
                     number(extra(method, "ops", HOST_READ)), number(extra(method, "ops", DETACH)), number(package),
                     number(lightning), number(package + lightning), number(extra(method, "calls", "other")),
                     number(sum(calls.values()))])
    parts = [format_table(headers, rows, title=f"== per training step, tiny models, b={BATCH}, cpu: operations "
                          f"dispatched and Python calls, (2S - S steps) / S, S={steps} ==")]
    parts.append(
        "every extra column: beyond the none of the same model (mlp: Linear(16,16), ReLU, Linear(16,10) on 16 "
        "features;\ncnn: Conv2d(3,8,3), ReLU, AdaptiveAvgPool2d(1), Flatten, Linear(8,10) on 3x8x8 images, for dense "
        "and CutMix,\nwhich need a feature map or images). tv-mixup includes 2 view ops (MixUp takes 4-d batches "
        "only).\nhost reads: aten::_local_scalar_dense (.item(), bool(t)); calls: sys.setprofile 'call' events, by the "
        "called\nfunction's file: lightning_multimix/, lightning/, anything else.")
    for method in methods:
        if method.name not in TOP_OPS_FOR:
            continue
        mine, base = found[key(method)]["ops"], found[f"none/{method.model}"]["ops"]
        diffs = {name: mine.get(name, 0.0) - base.get(name, 0.0) for name in set(mine) | set(base)}
        top = sorted((item for item in diffs.items() if item[1] > 0), key=lambda item: (-item[1], item[0]))[:10]
        fewer = sorted((item for item in diffs.items() if item[1] < 0), key=lambda item: (item[1], item[0]))
        table = format_table(("operation", "per step"), [[name, number(count)] for name, count in top],
                             title=f"== {method.name}: the 10 operations it adds most, per step beyond none ==")
        if fewer:
            table += ("\nfewer: " + ", ".join(f"{name} {number(count)}" for name, count in fewer)
                      + " (run less often than in none)")
        parts.append(table)
    return "\n\n".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--steps", type=int, default=100, help="S: every method is fitted for S and 2S steps")
    parser.add_argument("--out", default=str(OUT_DIR), help="output folder (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: S=5, {','.join(QUICK_METHODS)}")
    args = parser.parse_args(argv)
    steps = 5 if args.quick else args.steps
    methods = [m for m in METHODS if not args.quick or key(m) in QUICK_METHODS]
    quiet()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    info = machine_info("cpu")
    print_machine(info)
    found = measure(methods, steps)
    body = report(methods, found, steps)
    if not args.quick:
        try:
            eager, fused = objective_ops(False), objective_ops(True)
            body += ("\n\n" + format_table(
                ("objective", "top-level aten ops"), [["eager", eager], ["torch.compile", fused]],
                title="== multimix_objective alone, logit space, b=128, n=1000, forward + backward "
                      "(torch.profiler) =="))
        except Exception as error:  # no compiler on this machine: said, not fatal
            body += f"\n\ntorch.compile of the objective failed here: {type(error).__name__}: {error}"
    print(body)
    settings = (f"batch {BATCH}, CPU, one thread; every method fitted for {steps} and {2 * steps} steps, counts per "
                f"step = difference / {steps}; methods {', '.join(key(m) for m in methods)}")
    write_report(args.out, "step_cost_tiny_cpu.md", info, settings, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
