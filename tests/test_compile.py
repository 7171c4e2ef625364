"""``torch.compile`` and MultiMix: a compiled model trains with the callback and follows the eager run step for step.

Three places a user compiles:

- ``submodule``: ``self.net = torch.compile(net)`` in ``__init__``, the head outside;
- ``network``: the head inside the compiled module (``self.model = torch.compile(nn.Sequential(net, fc))``), so the
  callback's forward hooks run inside the compiled region (dynamo traces them; no graph break);
- ``module``: ``trainer.fit(torch.compile(lightning_module))``, for which Lightning compiles ``forward`` and
  ``training_step`` on the instance (``lightning.pytorch.utilities.compile.from_compiled``); MultiMix wraps the compiled
  step, and its own tail (sampling, mixing, loss) runs eagerly.

The default tests use dynamo with the ``aot_eager`` backend (what can break here is tracing, not code generation, and it
compiles in a second); one slow test uses the default ``inductor`` backend.
"""

from typing import Optional

import lightning as L
import pytest
import torch
from torch import nn

from helpers import RecordingMultiMix, TinyCNN, TinyMLP, loader, trainer
from lightning_multimix import Dense, SelfDistillation

MODES = {
    "plain": dict(n_tuples=5),
    "dense": dict(n_tuples=5, dense=Dense()),
    "distill": dict(n_tuples=5, distill=SelfDistillation(ema_decay=0.5, ema_warmup=False, warmup_steps=0)),
}


class Network(L.LightningModule):
    """The encoder and the head compiled as one module."""

    def __init__(self, base: TinyMLP, backend: str) -> None:
        super().__init__()
        self.model = torch.compile(nn.Sequential(base.net, base.fc), backend=backend)
        self.lr, self.momentum = base.lr, base.momentum

    def forward(self, x):
        return self.model(x)

    training_step = TinyMLP.training_step
    configure_optimizers = TinyMLP.configure_optimizers


def build(mode: str, where: Optional[str], backend: str = "aot_eager") -> L.LightningModule:
    torch.manual_seed(0)
    base = TinyCNN() if mode == "dense" else TinyMLP()
    if where == "submodule":
        base.net = torch.compile(base.net, backend=backend)
    elif where == "network":
        return Network(base, backend)
    elif where == "module":
        return torch.compile(base, backend=backend)
    return base


def fit(mode: str, where: Optional[str], backend: str = "aot_eager") -> RecordingMultiMix:
    callback = RecordingMultiMix(**MODES[mode], seed=3)
    trainer([callback], max_steps=3, max_epochs=-1).fit(build(mode, where, backend), loader(image=mode == "dense"))
    return callback


_eager: dict = {}


def eager_losses(mode: str) -> list:
    if mode not in _eager:
        _eager[mode] = fit(mode, None).losses
    return _eager[mode]


@pytest.mark.parametrize("where", ["submodule", "network", "module"])
@pytest.mark.parametrize("mode", list(MODES))
def test_compiled_model_trains_like_the_eager_one(mode, where):
    torch._dynamo.reset()
    callback = fit(mode, where)
    expected = eager_losses(mode)
    assert len(callback.losses) == len(expected) == 3
    # 3 steps of MultiMix losses, each depending on the weights (and the teacher) the previous steps produced
    torch.testing.assert_close(torch.stack(callback.losses), torch.stack(expected), rtol=1e-5, atol=1e-6)
    if where == "network":
        assert callback.head_path == "model._orig_mod.1"


def test_teacher_of_a_compiled_lightning_module_runs_its_own_weights():
    """``torch.compile(module)`` puts compiled methods bound to the student on the instance; a deep copy shares them,
    so a naive teacher would run the student's weights (and its head would never be called)."""
    torch._dynamo.reset()
    callback = fit("distill", "module")
    teacher = callback.teacher.module
    assert "forward" not in vars(teacher) and "training_step" not in vars(teacher)
    x, _ = callback.batches[-1]
    with torch.no_grad():
        expected = teacher.fc(teacher.net(x))  # the teacher's own layers
        torch.testing.assert_close(teacher(x), expected, rtol=0, atol=0)


@pytest.mark.slow
def test_inductor_compiled_lightning_module_trains_like_the_eager_one():
    torch._dynamo.reset()
    callback = fit("distill", "module", backend="inductor")
    torch.testing.assert_close(torch.stack(callback.losses), torch.stack(eager_losses("distill")), rtol=1e-4, atol=1e-5)
