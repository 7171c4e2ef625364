"""The callback's state back in the main process after a fit in spawned or forked processes (``ddp_spawn``, ...).

There the callback that trained is a copy in the workers. Rank 0 puts a :class:`_Delivery` among the
``trainer.callback_metrics`` that Lightning sends back and loads with ``torch.load(weights_only=True)``; unpickled, it
calls :func:`deliver` (allowed to load), which hands the state to the main process's callback (found by a token).
"""

from __future__ import annotations

import uuid
import weakref
from typing import Any, Callable

import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher  # the launcher of spawn, fork, notebook
from torch import Tensor

KEY = "multimix/batches_seen"
#: where each callback of this process takes its state back: token -> its bound method, weakly
_RECEIVERS: dict[str, weakref.WeakMethod] = {}


def register(receive: Callable[[dict[str, Any]], None]) -> str:
    """A new token under which ``receive`` (a bound method) gets the state a worker sends back."""
    for dead in [t for t, method in _RECEIVERS.items() if method() is None]:
        del _RECEIVERS[dead]
    token = uuid.uuid4().hex
    _RECEIVERS[token] = weakref.WeakMethod(receive)
    return token


def send_to_main_process(trainer: Any, token: str, state: dict[str, Any]) -> bool:
    """On rank 0 of a fit in spawned or forked processes, put ``state`` among the results Lightning sends back to the
    main process; ``False`` elsewhere (the process that trained is then the main one)."""
    if not isinstance(trainer.strategy.launcher, _MultiProcessingLauncher) or trainer.local_rank != 0:
        return False
    trainer.callback_metrics[KEY] = _Delivery(token, apply_to_collection(state, Tensor, lambda t: t.detach().cpu()))
    return True


class _Delivery:
    """Pickles as a call of :func:`deliver` with the token and the state."""

    def __init__(self, token: str, state: dict[str, Any]) -> None:
        self.token, self.state = token, state

    def __reduce__(self) -> tuple:
        return deliver, (self.token, self.state)


def deliver(token: str, state: dict[str, Any]) -> Tensor:
    """In the main process, as Lightning loads the workers' results: give ``state`` to the callback of ``token``."""
    method = _RECEIVERS.get(token)
    receive = method() if method is not None else None
    if receive is not None:
        receive(state)
    return torch.tensor(state.get("batches_seen", 0))


torch.serialization.add_safe_globals([deliver])  # Lightning loads the workers' results with weights_only=True
