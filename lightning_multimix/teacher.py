r"""Self-distillation: :class:`EMATeacher`, an EMA of the student's weights, and :class:`Distiller`, its fit logic."""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from lightning_multimix.capture import CallOrder, Capture, ran_before
from lightning_multimix.errors import MultiMixError
from lightning_multimix.objective import TeacherOutputs
from lightning_multimix.options import SelfDistillation

# what `lightning.pytorch.utilities.compile.from_compiled` sets on the instance of a `torch.compile`d module
_COMPILED_METHODS = ("forward", "training_step", "validation_step", "test_step", "predict_step")


def ema_decay_at(step: int, decay: float, warmup: bool = True) -> float:
    """The EMA decay after optimizer step ``step``: ``min(decay, (1 + step) / (10 + step))``, or ``decay`` unwarmed."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


class EMATeacher:
    """A frozen, eval-mode, picklable copy of ``model`` kept as an EMA of its weights (``decay`` in ``[0, 1]``).
    Make it before hooking ``model``: the copy carries the model's hooks.

    Example:
        >>> student = torch.nn.Linear(2, 2)
        >>> teacher = EMATeacher(student, decay=0.5, warmup=False)
        >>> _ = student.weight.data.add_(1.0)
        >>> teacher.update(student)
        >>> torch.allclose(teacher.module.weight, student.weight - 0.5)
        True
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"Expected `ema_decay` in [0, 1], got {decay!r}.")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        #: float32 masters of half-precision parameters, which the EMA moves
        self.masters: Optional[list[Tensor]] = None
        self.module = copy.deepcopy(model).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s parameters (no device sync); buffers are copied."""
        teacher_params, student_params = list(self.module.parameters()), list(model.parameters())
        if len(teacher_params) != len(student_params):
            raise MultiMixError(f"The teacher has {len(teacher_params)} parameter tensors but the model has "
                                f"{len(student_params)}: the model's structure changed after self-distillation "
                                "copied it at the start of the fit. Change the model before `trainer.fit`, or train "
                                "without `MultiMix(distill=...)`.")
        floating = [(t, s) for t, s in zip(teacher_params, student_params) if t.is_floating_point()]
        if floating:
            teachers, students = map(list, zip(*floating))
            average = get_ema_multi_avg_fn(ema_decay_at(self.num_updates, self.decay, self.warmup))
            if self.masters is None and any(t.dtype in (torch.float16, torch.bfloat16) for t in teachers):
                # in 16 bits a step (1 - decay) * (student - teacher) is below the teacher's last bit: use masters
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
    """Self-distillation in a fit: builds, runs, updates, synchronises, swaps in and checkpoints the EMA teacher.

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
        self._token: Optional[_TeacherToken] = None  # also on the student: a copy of both keeps its own teacher
        self._pending: Optional[dict[str, Any]] = None
        self._head: Optional[Capture] = None
        self.last_update_step = 0
        #: whether the module holds the teacher's weights right now (during validation with the teacher)
        self.swapped = False

    def attach(self, module: nn.Module, device: torch.device) -> None:
        """Make (or keep, when fitting the same module again) the teacher; call before hooking ``module``."""
        if self.teacher is None or self._token is None or module.__dict__.get(_TOKEN) is not self._token:
            self.teacher = EMATeacher(module, decay=self.options.ema_decay, warmup=self.options.ema_warmup)
            self._token = _TeacherToken()
            module.__dict__[_TOKEN] = self._token
            # steps set on the instance that are not the copy's own bound methods (Lightning's `from_compiled` wraps
            # the student's in torch.compile) would run the student: the teacher runs its class's, eagerly
            copy_ = self.teacher.module
            for name in [n for n in _COMPILED_METHODS if n in copy_.__dict__]:
                if getattr(copy_.__dict__[name], "__self__", None) is not copy_:
                    del copy_.__dict__[name]
        self.teacher.to(device)
        if device.type == "cpu" and any(p.ndim == 4 for p in self.teacher.module.parameters()):
            # CPU convolutions run faster channels-last; only the teacher's private copy changes layout
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
        """The teacher's head output (and input, ``with_embeddings``) from ``source`` on the student's arguments."""
        assert self.teacher is not None and self._head is not None, "attach() and watch() first"
        with torch.no_grad(), self._head:
            self.teacher.module.get_submodule(source)(*args, **kwargs)
        head = self._head
        return TeacherOutputs(logits=head.output, weight=self.beta(global_step), temperature=self.options.temperature,
                              targets=self.options.targets, embeddings=head.input if with_embeddings else None,
                              head=head.module if with_embeddings else None)

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

    def swap(self, module: nn.Module, swapped: bool) -> None:
        """Put the teacher's weights into ``module`` (``swapped=True``) or back; idempotent. A teacher restored from a
        state but not built by a fit yet is built first."""
        if self.options.validate_with_teacher and swapped and self.teacher is None and self._pending is not None:
            self.attach(module, next(module.parameters()).device)
        if self.options.validate_with_teacher and self.teacher is not None and self.swapped != swapped:
            self.teacher.swap_weights(module)
            self.swapped = swapped

    def state_dict(self) -> dict[str, Any]:
        teacher = self.teacher.state_dict() if self.teacher is not None else self._pending
        return {"teacher": teacher, "last_ema_step": self.last_update_step}

    def on_save_checkpoint(self, module: nn.Module, checkpoint: dict[str, Any], key: str) -> None:
        """With ``validate_with_teacher``: ``state_dict`` holds the teacher, ``callbacks[key]`` the student."""
        if not self.options.validate_with_teacher or self.teacher is None:
            return
        ours, theirs = module.state_dict(), self.teacher.module.state_dict()
        teacher, student = (ours, theirs) if self.swapped else (theirs, ours)
        checkpoint["state_dict"] = teacher
        if "callbacks" in checkpoint:  # not in a weights-only checkpoint
            checkpoint["callbacks"][key]["student"] = student

    def on_load_checkpoint(self, module: nn.Module, checkpoint: dict[str, Any], key: str) -> None:
        """Resuming a fit from a checkpoint that holds the teacher in its ``state_dict``: the student trains on."""
        student = checkpoint.get("callbacks", {}).get(key, {}).get("student")
        if student is not None:
            module.load_state_dict(student)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_update_step = state.get("last_ema_step", 0)
        # kept until `attach`, which may build a new teacher (a new module) and must give it this state too
        self._pending = state.get("teacher")
        if self._pending is not None and self.teacher is not None:
            self.teacher.load_state_dict(self._pending)


_TOKEN = "_multimix_teacher_token"


class _TeacherToken:
    """Marks the student a teacher was made from (a deep copy of both matches its own teacher)."""


def broadcast_buffers(module: nn.Module) -> None:
    """Give every process rank 0's buffers (one collective per dtype): batch-norm statistics drift per process."""
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


def check_teacher_entry(model: nn.Module, head_path: str, inputs: Optional[tuple[str, tuple, dict]],
                        order: Optional[CallOrder] = None) -> tuple[str, tuple, dict]:
    """What the teacher re-runs: ``inputs``, the outermost module on the way to the head that the step called, with
    its arguments. With the ``order`` the modules ran in (first batch), it must be the model's forward, not a block the
    step fed with another module's output."""
    why = "Self-distillation runs the teacher's own forward on the inputs of your model, but"
    how = "Call the model through `self(...)` in training_step, with a `forward` running the whole model to the logits."
    if inputs is None:
        raise MultiMixError(f"{why} the training step called no module on the way to the head {head_path!r} (it called "
                            f"the head itself). {how}")
    before = ran_before(model, inputs[0], order) if order is not None else None
    if before is not None:
        raise MultiMixError(f"{why} your training_step calls {before!r} and then {inputs[0]!r} itself (not through "
                            f"`forward`), so the teacher would run {inputs[0]!r} alone on the student's features. "
                            f"{how}")
    return inputs
