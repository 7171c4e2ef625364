r"""Self-distillation: the EMA teacher (an exponential moving average of the student's weights) and
:class:`Distiller`, which owns everything distillation needs during a fit (the teacher's copy, its targets, its
updates, its buffers across processes, validation on its weights, its place in checkpoints).

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
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from lightning_multimix.capture import Capture
from lightning_multimix.objective import TeacherOutputs
from lightning_multimix.options import SelfDistillation

# what `lightning.pytorch.utilities.compile.from_compiled` replaces on the instance of a `torch.compile`d module
_COMPILED_METHODS = ("forward", "training_step", "validation_step", "test_step", "predict_step")


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
        #: float32 copies of half-precision parameters, which the EMA moves (see :meth:`update`)
        self.masters: Optional[list[Tensor]] = None
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
            teachers, students = map(list, zip(*floating))
            average = get_ema_multi_avg_fn(self.decay_now())
            if self.masters is None and any(t.dtype in (torch.float16, torch.bfloat16) for t in teachers):
                # in half precision (`precision="bf16-true"`) a step `(1 - decay) * (student - teacher)` is below
                # the last bit of the teacher for decay near 1, and the teacher would never move: average float32
                # masters and round them into the teacher
                self.masters = [t.float().clone() for t in teachers]
            if self.masters is not None:
                average(self.masters, [s.float() for s in students], None)
                torch._foreach_copy_(teachers, self.masters)
            else:
                average(teachers, students, None)
        teacher_buffers = list(self.module.buffers())
        if teacher_buffers:
            torch._foreach_copy_(teacher_buffers, [b.detach() for b in model.buffers()])
        self.num_updates += 1

    def to(self, device: torch.device) -> "EMATeacher":
        self.module.to(device)
        if self.masters is not None:
            self.masters = [m.to(device) for m in self.masters]
        return self

    @torch.no_grad()
    def swap_weights(self, model: nn.Module) -> None:
        """Exchange the teacher's parameters and buffers with ``model``'s (for validating with the teacher)."""
        for teacher_tensor, student_tensor in zip(_tensors(self.module), _tensors(model)):
            teacher_tensor.data, student_tensor.data = student_tensor.data, teacher_tensor.data

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates, "masters": self.masters}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
        masters = state.get("masters")
        device = next(iter(_tensors(self.module)), torch.empty(0)).device
        self.masters = None if masters is None else [m.to(device).clone() for m in masters]


def _tensors(module: nn.Module) -> list[Tensor]:
    return [*module.parameters(), *module.buffers()]



class Distiller:
    """Self-distillation during a fit, for :class:`~lightning_multimix.MultiMix`: builds the EMA teacher from the
    module (before any hook is installed on it, so that the copy carries none), runs it without gradient on the
    inputs the student's step received, updates it once per optimizer step, keeps its buffers identical across
    processes, swaps its weights in for validation, and saves and restores it with checkpoints.

    Example:
        >>> student = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> distiller = Distiller(SelfDistillation(weight=0.5, warmup_steps=0))
        >>> distiller.attach(student, device=torch.device("cpu"))
        >>> distiller.watch(head_path="2")
        >>> x = torch.randn(5, 3)
        >>> outputs = distiller.outputs("", (x,), {}, global_step=0, with_embeddings=False)
        >>> torch.allclose(outputs.logits, student(x)), outputs.weight
        (True, 0.5)
        >>> distiller.detach()
    """

    def __init__(self, options: SelfDistillation) -> None:
        self.options = options
        self.teacher: Optional[EMATeacher] = None
        self._owner: Optional[int] = None
        self._pending: Optional[dict[str, Any]] = None
        self._head: Optional[Capture] = None
        #: the global step of the last EMA update (one per optimizer step)
        self.last_update_step = 0
        self._swapped = False

    def attach(self, module: nn.Module, device: torch.device) -> None:
        """Make (or keep, when fitting the same module again) the teacher; call before hooking ``module``."""
        if self.teacher is None or self._owner != id(module):
            self.teacher = EMATeacher(module, decay=self.options.ema_decay, warmup=self.options.ema_warmup)
            self._owner = id(module)
            # `trainer.fit(torch.compile(module))` set compiled `forward`/`*_step` on the instance, bound to the
            # student: the copy would run the student's weights. The teacher runs its own methods (eagerly).
            for name in _COMPILED_METHODS if hasattr(module, "_compiler_ctx") else ():
                self.teacher.module.__dict__.pop(name, None)
        self.teacher.to(device)
        if device.type == "cpu" and any(p.ndim == 4 for p in self.teacher.module.parameters()):
            # CPU convolutions run more than twice as fast in channels-last memory; same values to float rounding.
            # Only the teacher's private copy changes layout.
            self.teacher.module.to(memory_format=torch.channels_last)
        if self._pending is not None:
            self.teacher.load_state_dict(self._pending)
            self._pending = None

    def watch(self, head_path: str) -> None:
        """Record the teacher's head (at ``head_path``, the student's head) when the teacher runs."""
        self.detach()
        self._head = Capture(self.teacher.module.get_submodule(head_path))

    def detach(self) -> None:
        if self._head is not None:
            self._head.remove()
            self._head = None

    def beta(self, global_step: int) -> float:
        return self.options.beta(global_step)

    def outputs(self, source: str, args: tuple, kwargs: dict, global_step: int,
                with_embeddings: bool) -> TeacherOutputs:
        """The teacher's view of the batch: its submodule ``source`` run without gradient on the arguments the
        student's received, its head's output (and input, ``with_embeddings``)."""
        assert self.teacher is not None and self._head is not None, "attach() and watch() first"
        with torch.no_grad(), self._head:
            self.teacher.module.get_submodule(source)(*args, **kwargs)
        head = self._head.module if with_embeddings else None
        return TeacherOutputs(
            logits=self._head.output, weight=self.beta(global_step), temperature=self.options.temperature,
            targets=self.options.targets, embeddings=self._head.input if with_embeddings else None, head=head,
        )

    def start(self, global_step: int) -> None:
        """A fit starts (or resumes) at ``global_step``: the next optimizer step updates the teacher."""
        self.last_update_step = global_step

    def update(self, module: nn.Module, global_step: int, world_size: int) -> None:
        """One EMA update per optimizer step (not per batch under gradient accumulation)."""
        if self.teacher is None or global_step == self.last_update_step:
            return
        self.teacher.update(module)
        self.last_update_step = global_step
        if world_size > 1:
            broadcast_buffers(self.teacher.module)

    @property
    def swapped(self) -> bool:
        """Whether the module holds the teacher's weights right now (during validation with the teacher)."""
        return self._swapped

    def swap(self, module: nn.Module, swapped: bool) -> None:
        """Put the teacher's weights into ``module`` (``swapped=True``) or back; idempotent."""
        if self.options.validate_with_teacher and self.teacher is not None and self._swapped != swapped:
            self.teacher.swap_weights(module)
            self._swapped = swapped

    def state_dict(self) -> dict[str, Any]:
        teacher = self.teacher.state_dict() if self.teacher is not None else self._pending
        return {"teacher": teacher, "last_ema_step": self.last_update_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_update_step = state.get("last_ema_step", 0)
        # kept until `attach`, which may build a new teacher (a new module) and must give it this state too
        self._pending = state.get("teacher")
        if self._pending is not None and self.teacher is not None:
            self.teacher.load_state_dict(self._pending)


def broadcast_buffers(module: nn.Module) -> None:
    """Give every process rank 0's buffers (one collective per dtype).

    DDP re-broadcasts the student's buffers at each forward, after which each process's batch-norm statistics drift
    apart on its own batch; the teacher copies them, so it must be re-synchronised to stay identical across processes.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for buffer in module.buffers():
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    for buffers in by_dtype.values():
        flat = torch.cat([b.reshape(-1) for b in buffers])
        torch.distributed.broadcast(flat, src=0)
        received = flat.split([b.numel() for b in buffers])
        torch._foreach_copy_(buffers, [r.view_as(b) for r, b in zip(received, buffers)])
