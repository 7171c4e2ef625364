"""MultiMix for PyTorch Lightning: interpolate a myriad of embeddings with one callback.

Layout: a pure tensor core with no Lightning import (:mod:`~lightning_multimix.sampling`,
:mod:`~lightning_multimix.interpolation`, :mod:`~lightning_multimix.losses`, :mod:`~lightning_multimix.dense`,
:mod:`~lightning_multimix.objective`) under a thin Lightning layer (:mod:`~lightning_multimix.callback`,
:mod:`~lightning_multimix.options`, :mod:`~lightning_multimix.capture`, :mod:`~lightning_multimix.heads`,
:mod:`~lightning_multimix.batch`, :mod:`~lightning_multimix.teacher`, :mod:`~lightning_multimix.mixin`,
:mod:`~lightning_multimix.metrics`). The demo (:mod:`lightning_multimix.demo`) sits beside the library, which never
imports it.
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
