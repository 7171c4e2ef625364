r"""The self-distillation teacher: an exponential moving average (EMA) of the student's weights.

Update after optimizer step ``t`` (``t = 0, 1, ...``), with the warm-up of the decay (``warmup=True``)::

    decay_t = min(decay, (1 + t) / (10 + t))
    teacher = decay_t * teacher + (1 - decay_t) * student          # parameters, one multi-tensor lerp
    teacher_buffers = student_buffers                                # batch-norm statistics follow the student

The warm-up lets an early teacher track the fast-moving student (``decay_0 = 0.1``) and reaches ``decay`` after
``(10 * decay - 1) / (1 - decay)`` steps (about 9,000 for ``decay=0.999``).

The update uses torch's EMA machinery (``torch.optim.swa_utils.get_ema_multi_avg_fn``: one ``torch._foreach_lerp_``
over all parameters). The step count lives on the host, so an update never synchronises with the device (which
``AveragedModel.update_parameters`` does, through its ``n_averaged == 0`` test).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import get_ema_multi_avg_fn


def ema_decay_at(step: int, decay: float, warmup: bool = True) -> float:
    """The EMA decay used by the update after optimizer step ``step``.

    Example:
        >>> ema_decay_at(0, 0.999), ema_decay_at(0, 0.999, warmup=False), ema_decay_at(100_000, 0.999)
        (0.1, 0.999, 0.999)
    """
    if not warmup:
        return decay
    return min(decay, (1.0 + step) / (10.0 + step))


class EMATeacher:
    """A frozen, eval-mode copy of ``model`` kept as an EMA of its weights.

    It is a plain picklable object (no closures), is in no optimizer and never requires grad. Copy the model before
    installing any hook on it: the copy carries the model's module hooks.

    Example:
        >>> student = torch.nn.Linear(2, 2)
        >>> teacher = EMATeacher(student, decay=0.5, warmup=False)
        >>> with torch.no_grad():
        ...     _ = student.weight.add_(1.0)
        >>> teacher.update(student)
        >>> torch.allclose(teacher.module.weight, student.weight - 0.5)
        True
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"Expected `ema_decay` in [0, 1], got {decay!r}.")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.module.eval()

    def decay_now(self) -> float:
        return ema_decay_at(self.num_updates, self.decay, self.warmup)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s parameters; buffers are copied."""
        teacher_params = [p for p in self.module.parameters()]
        student_params = [p.detach() for p in model.parameters()]
        if len(teacher_params) != len(student_params):
            raise RuntimeError(
                f"The teacher has {len(teacher_params)} parameter tensors but the model has {len(student_params)}: "
                "the model's structure changed after MultiMix(distill=True) copied it."
            )
        floating = [(t, s) for t, s in zip(teacher_params, student_params) if t.is_floating_point()]
        if floating:
            teachers, students = zip(*floating)
            get_ema_multi_avg_fn(self.decay_now())(list(teachers), list(students), None)
        teacher_buffers = list(self.module.buffers())
        if teacher_buffers:
            torch._foreach_copy_(teacher_buffers, [b.detach() for b in model.buffers()])
        self.num_updates += 1

    def to(self, device: torch.device) -> "EMATeacher":
        self.module.to(device)
        return self

    @torch.no_grad()
    def swap_weights(self, model: nn.Module) -> None:
        """Exchange the teacher's parameters and buffers with ``model``'s (for validating with the teacher)."""
        for teacher_tensor, student_tensor in zip(_tensors(self.module), _tensors(model)):
            teacher_tensor.data, student_tensor.data = student_tensor.data, teacher_tensor.data

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])


def _tensors(module: nn.Module) -> list[Tensor]:
    return [*module.parameters(), *module.buffers()]

