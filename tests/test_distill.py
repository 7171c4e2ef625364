"""Self-distillation from an EMA teacher (issue 4): the teacher, its targets, its ramp, validation and checkpoints.

Single-process properties only (the DDP identity of the teacher is tested in ``test_ddp.py``).
"""

from __future__ import annotations

import pickle

import lightning as L
import pytest
import torch
from torch import Tensor, nn

from helpers_models import Classifier, ParamRecorder, Recording, TinyConv, TinyMLP, loader, quiet_trainer, soft_ce
from lightning_multimix import Dense, MultiMix, SelfDistillation
from lightning_multimix.teacher import EMATeacher, ema_decay_at


def data(n: int = 12, dim: int = 5, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randint(0, 3, (n,), generator=g)


def fixed_weights(m: int, n: int = 6, seed: int = 7) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(m, n, generator=g) + 0.05
    return w / w.sum(0, keepdim=True)


def hand_ema(start: dict[str, Tensor], students: list[dict[str, Tensor]], decay: float) -> dict[str, Tensor]:
    """teacher <- d_t * teacher + (1 - d_t) * student_t, d_t = min(decay, (1 + t) / (10 + t)), written out."""
    teacher = {k: v.clone() for k, v in start.items()}
    for t, student in enumerate(students):
        d = min(decay, (1 + t) / (10 + t))
        teacher = {k: d * teacher[k] + (1 - d) * student[k] for k in teacher}
    return teacher


# ---------------------------------------------------------------------------------------------- the EMA teacher, alone


def test_decay_warmup_formula():
    assert ema_decay_at(0, 0.999) == pytest.approx(1 / 10)
    assert ema_decay_at(1, 0.999) == pytest.approx(2 / 11)
    assert ema_decay_at(90, 0.999) == pytest.approx(91 / 100)
    assert ema_decay_at(8990, 0.999) == pytest.approx(0.999)  # (1 + t) / (10 + t) reaches 0.999 at t = 8990
    assert ema_decay_at(10**6, 0.999) == 0.999
    assert ema_decay_at(0, 0.999, warmup=False) == 0.999
    assert ema_decay_at(0, 0.05) == 0.05  # a decay below the warm-up curve is used as is


def test_ema_update_by_hand():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    start = {k: v.detach().clone() for k, v in student.named_parameters()}
    teacher = EMATeacher(student, decay=0.999, warmup=True)
    assert teacher.module is not student and teacher.num_updates == 0
    assert not teacher.module.training
    assert not any(p.requires_grad for p in teacher.module.parameters())
    snapshots = []
    for _ in range(3):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        student.train()(torch.randn(8, 3))  # moves the batch-norm statistics
        teacher.update(student)
        snapshots.append({k: v.detach().clone() for k, v in student.named_parameters()})
    expected = hand_ema(start, snapshots, 0.999)
    for name, value in teacher.module.named_parameters():
        torch.testing.assert_close(value, expected[name])
    for (name, value), (_, student_value) in zip(teacher.module.named_buffers(), student.named_buffers()):
        assert torch.equal(value, student_value), name  # buffers follow the student
    assert teacher.num_updates == 3
    assert not teacher.module.training  # the student's train() did not reach it


def test_ema_update_without_warmup_and_state_round_trip():
    student = nn.Linear(2, 2)
    teacher = EMATeacher(student, decay=0.75, warmup=False)
    before = teacher.module.weight.detach().clone()
    with torch.no_grad():
        student.weight.add_(4.0)
    teacher.update(student)
    torch.testing.assert_close(teacher.module.weight, 0.75 * before + 0.25 * student.weight.detach())
    clone = EMATeacher(nn.Linear(2, 2), decay=0.75, warmup=False)
    clone.load_state_dict(pickle.loads(pickle.dumps(teacher.state_dict())))
    assert clone.num_updates == 1 and torch.equal(clone.module.weight, teacher.module.weight)


def test_swap_weights_and_back():
    student = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    other = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    teacher = EMATeacher(other, warmup=False)
    s0 = [t.detach().clone() for t in [*student.parameters(), *student.buffers()]]
    t0 = [t.detach().clone() for t in [*teacher.module.parameters(), *teacher.module.buffers()]]
    teacher.swap_weights(student)
    assert all(torch.equal(a, b) for a, b in zip([*student.parameters(), *student.buffers()], t0))
    teacher.swap_weights(student)
    assert all(torch.equal(a, b) for a, b in zip([*student.parameters(), *student.buffers()], s0))
    assert all(torch.equal(a, b) for a, b in zip([*teacher.module.parameters(), *teacher.module.buffers()], t0))


def test_bad_decay_rejected():
    with pytest.raises(ValueError, match="ema_decay"):
        EMATeacher(nn.Linear(2, 2), decay=1.5)
    with pytest.raises(ValueError, match="ema_decay"):
        MultiMix(distill=SelfDistillation(ema_decay=-0.1))
    with pytest.raises(ValueError, match=r"SelfDistillation: invalid `weight=1.5`; expected a value in \[0, 1\]"):
        SelfDistillation(weight=1.5)
    with pytest.raises(ValueError, match="targets='soft'"):
        SelfDistillation(targets="soft")
    with pytest.raises(ValueError, match="temperature=0"):
        SelfDistillation(temperature=0)
    with pytest.raises(ValueError, match="warmup_steps=-1"):
        SelfDistillation(warmup_steps=-1)
    # the old flat arguments are gone, and a bare True says what to pass instead
    with pytest.raises(ValueError, match=r"distill=True.*MultiMix\(distill=SelfDistillation\(\)\)"):
        MultiMix(distill=True)
    with pytest.raises(TypeError, match="distill_weight"):
        MultiMix(distill=SelfDistillation(), distill_weight=0.5)


# ---------------------------------------------------------------------------------------------------- targets, by hand


@pytest.mark.parametrize("beta, temperature", [(1.0, 1.0), (0.5, 2.0)])
def test_probs_targets_at_step_zero(beta, temperature):
    """At step 0 the teacher is the student: targets ((1 - beta) Y + beta softmax(L / T)) Lambda, L the model's own
    logits (a model without dropout or batch norm, so train and eval modes agree)."""
    torch.manual_seed(0)
    x, y = data(4)
    module = Classifier(TinyMLP())
    with torch.no_grad():
        logits = module(x)
    weights = fixed_weights(4)
    options = SelfDistillation(weight=beta, targets="probs", temperature=temperature, warmup_steps=0)
    callback = Recording(distill=options, weights=lambda m: weights)
    quiet_trainer([callback], max_steps=1).fit(module, loader(x, y, batch_size=4))
    one_hot = torch.eye(3)[y]
    targets = weights.T @ ((1 - beta) * one_hot + beta * torch.softmax(logits / temperature, dim=1))
    torch.testing.assert_close(callback.losses[0], soft_ce(weights.T @ logits, targets))
    torch.testing.assert_close(callback.teacher_outputs[0][1], logits)


@pytest.mark.parametrize("logit_space", ["auto", "never"])
def test_logits_targets_at_step_zero(logit_space):
    """distill_targets='logits': softmax(g_T(Z_T Lambda) / T) mixed with Y Lambda by beta; g_T affine, so in both
    spaces g_T(Z Lambda) = L^T Lambda."""
    torch.manual_seed(0)
    x, y = data(4)
    module = Classifier(TinyMLP())
    with torch.no_grad():
        logits = module(x)
    weights = fixed_weights(4)
    beta, temperature = 0.75, 3.0
    options = SelfDistillation(weight=beta, targets="logits", temperature=temperature, warmup_steps=0)
    callback = Recording(distill=options, logit_space=logit_space, weights=lambda m: weights)
    quiet_trainer([callback], max_steps=1).fit(module, loader(x, y, batch_size=4))
    mixed = weights.T @ logits
    targets = (1 - beta) * (weights.T @ torch.eye(3)[y]) + beta * torch.softmax(mixed / temperature, dim=1)
    torch.testing.assert_close(callback.losses[0], soft_ce(mixed, targets))


def test_distill_weight_zero_is_plain_multimix():
    x, y = data(12)
    runs = {}
    for distill in (False, True):
        torch.manual_seed(0)
        module = Classifier(TinyMLP(batch_norm=True))
        options = SelfDistillation(weight=0.0, warmup_steps=0) if distill else None
        callback = Recording(n_tuples=9, seed=11, distill=options)
        quiet_trainer([callback], max_steps=3).fit(module, loader(x, y, batch_size=4))
        runs[distill] = (torch.stack(callback.losses), [p.detach() for p in module.parameters()])
    assert torch.equal(runs[True][0], runs[False][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[True][1], runs[False][1]))


class LoggedBeta(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        self.values.append(float(trainer.callback_metrics["multimix/distill_weight"]))


def test_beta_ramps_linearly_and_is_logged_and_used():
    """beta_t = w * min(1, t / warmup) at global step t, logged as multimix/distill_weight, and the targets of every
    step are built with it from the teacher's logits of that step."""
    x, y = data(24)
    torch.manual_seed(0)
    weights = fixed_weights(4)
    callback = Recording(distill=SelfDistillation(weight=0.8, warmup_steps=4, ema_decay=0.5), weights=lambda m: weights)
    student_logits: list[Tensor] = []
    module = Classifier(TinyMLP())
    def record(head, args, out):  # the student's forward (the teacher, a copy, has the hook too but runs without grad)
        if out.requires_grad:
            student_logits.append(out.detach().clone())

    module.net.fc.register_forward_hook(record)
    logged = LoggedBeta()
    quiet_trainer([callback, logged], max_steps=6, log_every_n_steps=1).fit(module, loader(x, y, batch_size=4))
    betas = [0.0, 0.2, 0.4, 0.6, 0.8, 0.8]
    assert logged.values == pytest.approx(betas)
    for step, beta in enumerate(betas):
        one_hot = torch.eye(3)[y[4 * step: 4 * step + 4]]
        teacher_probs = torch.softmax(callback.teacher_outputs[step][1], dim=1)
        targets = weights.T @ ((1 - beta) * one_hot + beta * teacher_probs)
        torch.testing.assert_close(callback.losses[step], soft_ce(weights.T @ student_logits[step], targets))
    # the teacher has left the student: its logits differ from the student's after the first updates
    assert not torch.allclose(callback.teacher_outputs[5][1], student_logits[5])


# ------------------------------------------------------------------------------------------- the teacher in a real run


class TeacherProbe(L.Callback):
    """During training, checks what the teacher is and is not: no grad, eval, not in the optimizer, no student hooks."""

    def __init__(self, multimix: MultiMix) -> None:
        self.multimix = multimix
        self.checked = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        teacher = self.multimix.teacher.module
        assert teacher is not pl_module and not teacher.training
        assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
        assert all(p.device == pl_module.device for p in teacher.parameters())
        optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        assert not optimized & {id(p) for p in teacher.parameters()}
        assert len(optimized) == len(list(pl_module.parameters()))
        # the only hook on the teacher is the callback's own capture of the teacher's head
        hooked = [name for name, m in teacher.named_modules() if m._forward_hooks or m._forward_pre_hooks]
        assert hooked == ["net.fc"], hooked
        assert "training_step" not in teacher.__dict__
        self.checked += 1


def test_teacher_is_the_hand_computed_ema_of_the_student():
    x, y = data(12)
    torch.manual_seed(0)
    module = Classifier(TinyMLP(batch_norm=True))
    start = {k: v.detach().clone() for k, v in module.named_parameters()}
    callback = Recording(distill=SelfDistillation(ema_decay=0.999), n_tuples=8, seed=0)
    recorder, probe = ParamRecorder(), TeacherProbe(callback)
    quiet_trainer([callback, recorder, probe], max_steps=3).fit(module, loader(x, y, batch_size=4))
    assert probe.checked == 3 and callback.teacher.num_updates == 3 and callback.distiller.last_update_step == 3
    expected = hand_ema(start, recorder.params, 0.999)
    for name, value in callback.teacher.module.named_parameters():
        torch.testing.assert_close(value, expected[name])
        if not torch.equal(start[name], recorder.params[-1][name]):  # (a bias before batch norm gets no gradient)
            assert not torch.allclose(value, recorder.params[-1][name])  # it lags the student
    for name, value in callback.teacher.module.named_buffers():
        assert torch.equal(value, recorder.buffers[-1][name]), name
    # the teacher ran without gradient, in eval mode (batch-norm running statistics, not the batch's)
    assert all(not logits.requires_grad for _, logits in callback.teacher_outputs)
    # fit is over: nothing of the callback is left on the teacher, which pickles
    assert not any(m._forward_hooks for m in callback.teacher.module.modules())
    restored = pickle.loads(pickle.dumps(callback.teacher))
    assert torch.equal(restored.module.net.fc.weight, callback.teacher.module.net.fc.weight)


def val_loss(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return nn.functional.cross_entropy(net.eval()(x), y)


@pytest.mark.parametrize("with_teacher", [True, False])
def test_validate_with_teacher(with_teacher):
    x, y = data(12)
    xv, yv = data(8, seed=1)
    torch.manual_seed(0)
    module = Classifier(TinyMLP(batch_norm=True))
    # a fast teacher (decay 0.5, no warm-up) so that it is far from the student after 3 steps
    options = SelfDistillation(ema_decay=0.5, ema_warmup=False, validate_with_teacher=with_teacher)
    callback = MultiMix(n_tuples=8, seed=0, distill=options)
    recorder = ParamRecorder()
    trainer = quiet_trainer([callback, recorder], max_epochs=1, limit_train_batches=3)
    trainer.fit(module, loader(x, y, batch_size=4), loader(xv, yv, batch_size=8))
    teacher_loss = val_loss(callback.teacher.module.net, xv, yv)
    student_loss = val_loss(module.net, xv, yv)
    assert not torch.isclose(teacher_loss, student_loss)
    torch.testing.assert_close(trainer.callback_metrics["val_loss"], teacher_loss if with_teacher else student_loss)
    # swapped back: the student has its own weights, the teacher its own
    assert not callback.distiller.swapped
    for name, value in module.named_parameters():
        assert torch.equal(value, recorder.params[-1][name]), name
    assert not torch.equal(callback.teacher.module.net.fc.weight, module.net.fc.weight)


# --------------------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_restores_teacher_ema_count_and_ramp(tmp_path):
    x, y = data(20)
    options = dict(n_tuples=8, seed=0, distill=SelfDistillation(warmup_steps=10, ema_decay=0.999))
    torch.manual_seed(0)
    first = MultiMix(**options)
    trainer = quiet_trainer([first], max_steps=3, max_epochs=-1)
    trainer.fit(Classifier(TinyMLP(batch_norm=True)), loader(x, y, batch_size=4))
    path = tmp_path / "three.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["callbacks"]
    (saved,) = [v for k, v in state.items() if k.startswith("MultiMix")]
    assert saved["teacher"]["num_updates"] == 3 and saved["last_ema_step"] == 3

    # a new callback and a differently initialised module: the teacher comes from the checkpoint
    torch.manual_seed(123)
    second = MultiMix(**options)
    resumed = quiet_trainer([second], max_steps=3, max_epochs=-1)  # nothing left to train: restore only
    resumed.fit(Classifier(TinyMLP(batch_norm=True)), loader(x, y, batch_size=4), ckpt_path=path)
    assert second.teacher.num_updates == 3 and second.distiller.last_update_step == 3
    for (name, a), (_, b) in zip(first.teacher.module.state_dict().items(), second.teacher.module.state_dict().items()):
        assert torch.equal(a, b), name
    assert second.distill.beta(resumed.global_step) == first.distill.beta(trainer.global_step) == pytest.approx(0.15)

    # one more step continues the EMA where it stopped: decay (1 + 3) / (10 + 3)
    third = MultiMix(**options)
    recorder = ParamRecorder()
    teacher_before = {k: v.clone() for k, v in second.teacher.module.named_parameters()}
    quiet_trainer([third, recorder], max_steps=4, max_epochs=-1).fit(
        Classifier(TinyMLP(batch_norm=True)), loader(x, y, batch_size=4), ckpt_path=path
    )
    assert third.teacher.num_updates == 4
    d = 4 / 13
    for name, value in third.teacher.module.named_parameters():
        torch.testing.assert_close(value, d * teacher_before[name] + (1 - d) * recorder.params[-1][name])


@pytest.mark.parametrize("teacher_before_load", [False, True], ids=["no-teacher-yet", "teacher-of-another-module"])
def test_a_loaded_state_reaches_the_teacher_built_at_the_next_fit(teacher_before_load):
    """``load_state_dict`` keeps the teacher's state until fit builds the teacher, also when the callback already has
    a teacher (of another module): the teacher built for the module fitted next gets it."""
    x, y = data(8)
    torch.manual_seed(0)
    first = MultiMix(n_tuples=4, seed=0, distill=SelfDistillation(ema_decay=0.5, ema_warmup=False))
    quiet_trainer([first], max_steps=2).fit(Classifier(TinyMLP()), loader(x, y, batch_size=4))
    second = MultiMix(n_tuples=4, seed=0, distill=SelfDistillation(ema_decay=0.5, ema_warmup=False))
    if teacher_before_load:
        quiet_trainer([second], max_steps=1).fit(Classifier(TinyMLP()), loader(x, y, batch_size=4))
    second.load_state_dict(pickle.loads(pickle.dumps(first.state_dict())))
    if not teacher_before_load:
        assert second.teacher is None and second.state_dict()["teacher"] is not None  # kept while pending
    module = Classifier(TinyMLP())
    second.setup(quiet_trainer(), module, "fit")  # what fit does first
    second.on_fit_start(quiet_trainer(), module)
    try:
        assert second.teacher.num_updates == 2
        assert torch.equal(second.teacher.module.net.fc.weight, first.teacher.module.net.fc.weight)
    finally:
        second._uninstall()


# ------------------------------------------------------------------------------------------------- precision and dense


def test_bf16_mixed_teacher_runs_in_training_precision():
    torch.manual_seed(0)
    x, y = torch.randn(8, 2, 4, 4), torch.arange(8) % 3
    callback = Recording(dense=Dense(), distill=SelfDistillation(warmup_steps=0), n_tuples=8, seed=0)
    quiet_trainer([callback], max_steps=2, precision="bf16-mixed").fit(Classifier(TinyConv()), loader(x, y, 4))
    assert all(logits.dtype == torch.bfloat16 for _, logits in callback.teacher_outputs)
    assert all(p.dtype == torch.float32 for p in callback.teacher.module.parameters())
    assert all(torch.isfinite(loss) for loss in callback.losses)


def test_a_callback_reused_on_another_module_builds_a_new_teacher():
    callback = MultiMix(distill=SelfDistillation(), n_tuples=4, seed=0)
    x, y = data()
    torch.manual_seed(0)
    quiet_trainer([callback], max_steps=2).fit(Classifier(TinyMLP(), lr=0.1), loader(x, y, 4))
    torch.manual_seed(1)
    second = Classifier(TinyMLP(), lr=0.0)  # lr 0: the student, hence the EMA teacher, keeps its initial weights
    quiet_trainer([callback], max_steps=1).fit(second, loader(x, y, 4))
    for (name, p), q in zip(second.named_parameters(), callback.teacher.module.parameters()):
        torch.testing.assert_close(q, p, msg=f"teacher {name} is not the second module's")


def test_a_second_fit_of_the_same_module_keeps_updating_the_teacher():
    """A new Trainer starts its step count at 0 again: the teacher still takes one update per optimizer step."""
    callback = MultiMix(distill=SelfDistillation(), n_tuples=4, seed=0)
    module, (x, y) = Classifier(TinyMLP()), data()
    quiet_trainer([callback], max_steps=3).fit(module, loader(x, y, 4))
    quiet_trainer([callback], max_steps=2).fit(module, loader(x, y, 4))
    assert callback.teacher.num_updates == 5 and callback.distiller.last_update_step == 2


def test_a_bf16_teacher_moves_through_float32_masters():
    """In bfloat16 one EMA step ``(1 - 0.999) * (student - teacher)`` is below the teacher's last bit: without
    float32 masters the teacher never moves. With them, after k steps towards a student ``delta`` away the master is
    ``delta * (1 - 0.999**k)`` away from the start, which the bf16 weights show once it passes half a bit."""
    student = nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        student.weight.fill_(1.0)
    teacher = EMATeacher(student, decay=0.999, warmup=False)
    delta = 2.0 ** -7  # one bf16 bit at 1.0
    with torch.no_grad():
        student.weight.fill_(1.0 + delta)
    for _ in range(1000):
        teacher.update(student)
    expected = 1.0 + delta * (1.0 - 0.999 ** 1000)  # 1.0049, more than half a bit (0.0039) from 1.0
    assert teacher.masters[0].dtype == torch.float32
    torch.testing.assert_close(teacher.masters[0].item(), expected, rtol=0, atol=1e-6)
    assert teacher.module.weight.item() == 1.0 + delta  # rounded to the nearest bf16 value
    restored = EMATeacher(student, decay=0.999, warmup=False)
    restored.load_state_dict(teacher.state_dict())
    assert torch.equal(restored.masters[0], teacher.masters[0])


def test_a_float32_teacher_has_no_masters():
    teacher = EMATeacher(nn.Linear(2, 2), decay=0.9)
    teacher.update(nn.Linear(2, 2))
    assert teacher.masters is None
