"""MultiMix for PyTorch Lightning: interpolate a myriad of embeddings with one callback.

A pure tensor core (no Lightning import):

- :mod:`~lightning_multimix.options`: every option, declared once (type, default, check, meaning);
- :mod:`~lightning_multimix.sampling`: the interpolation weights, from an explicit generator;
- :mod:`~lightning_multimix.interpolation`: mixing values with weights, and when it commutes with a head;
- :mod:`~lightning_multimix.targets`: what the targets are (read once from the labels and the user's loss), and
  building them;
- :mod:`~lightning_multimix.dense`: Dense MultiMix, per-position weights and losses;
- :mod:`~lightning_multimix.objective`: the losses of a batch, :func:`multimix_objective` and :func:`mixup_objective`;
- :mod:`~lightning_multimix.errors`: :class:`MultiMixError`.

Under a thin Lightning layer:

- :mod:`~lightning_multimix.callback`: the :class:`MultiMix` callback, its life cycle, state and log;
- :mod:`~lightning_multimix.step`: one training step;
- :mod:`~lightning_multimix.head`: where the head and dense mode's feature map are, decided in one place;
- :mod:`~lightning_multimix.capture`: forward hooks that record what a step runs;
- :mod:`~lightning_multimix.feature_maps`: reading dense mode's feature map and checking it feeds the head;
- :mod:`~lightning_multimix.batch`: the labels and inputs of a batch, and input mixup;
- :mod:`~lightning_multimix.teacher`: the EMA teacher of self-distillation;
- :mod:`~lightning_multimix.monitor`: the optimised loss, logged and checked on the device (non-finite, labels);
- :mod:`~lightning_multimix.spawn`: the callback's state back from spawned processes;
- :mod:`~lightning_multimix.mixin`: :class:`MultiMixMixin`, where a module says where things are;
- :mod:`~lightning_multimix.metrics`: embedding alignment and uniformity.

The demo (:mod:`lightning_multimix.demo`) sits beside the library, which never imports it.
"""

from lightning_multimix.callback import MultiMix
from lightning_multimix.errors import MultiMixError
from lightning_multimix.mixin import MultiMixMixin
from lightning_multimix.objective import TeacherOutputs, mixup_objective, multimix_objective
from lightning_multimix.options import Dense, SelfDistillation

__version__ = "0.2.0.dev0"
__all__ = [
    "Dense",
    "MultiMix",
    "MultiMixError",
    "MultiMixMixin",
    "SelfDistillation",
    "TeacherOutputs",
    "__version__",
    "mixup_objective",
    "multimix_objective",
]
