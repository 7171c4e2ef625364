"""MultiMix for PyTorch Lightning: interpolate a myriad of embeddings with one callback.

Layout: a pure tensor core (:mod:`~lightning_multimix.sampling`, :mod:`~lightning_multimix.interpolation`,
:mod:`~lightning_multimix.dense`, :mod:`~lightning_multimix.losses`; no Lightning import) under a thin Lightning layer
(:mod:`~lightning_multimix.callback`, :mod:`~lightning_multimix.mixin`, :mod:`~lightning_multimix.teacher`).
"""

from lightning_multimix.callback import MultiMix, MultiMixError
from lightning_multimix.mixin import MultiMixMixin

__version__ = "0.1.0"
__all__ = ["MultiMix", "MultiMixError", "MultiMixMixin", "__version__"]
