"""Resume: 4 steps in one run equal, bit for bit on CPU, 2 steps + checkpoint + a fresh process resuming for 2 more.

What a resumed run must restore: the weights and the optimizer (Lightning), the teacher (MultiMix's checkpoint state),
the callback's random stream (its base seed and the number of batches it has seen: the weights of batch ``t`` are a
pure function of ``(base_seed, rank, t)``) and the step counters (the teacher's update count and last EMA step, which
drive the EMA warm-up and the distillation ramp).

Why epochs of 2 batches: Lightning resumes a checkpoint written mid-epoch at the next batch index but, unless the
DataLoader is stateful, restarts that epoch's data from its first batch, so the resumed run would see different data
from the uninterrupted one for reasons that have nothing to do with MultiMix. With 2 batches per epoch and the
checkpoint written after batch 2 (the last of epoch 0), the resumed run starts epoch 1 on the same data as the
uninterrupted one. The loader does not shuffle (a shuffling sampler draws from the global RNG, which Lightning does not
checkpoint), and the model has no dropout, for the same reason.
"""

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers import RecordingMultiMix, TinyMLP, loader, trainer
from lightning_multimix import SelfDistillation

CONFIGS = {
    # seed=None: the base seed is drawn from the global RNG at setup, so only the checkpoint can restore it
    "plain": dict(n_tuples=6, seed=None),
    "distill": dict(n_tuples=6, seed=None, distill=SelfDistillation(ema_decay=0.9, warmup_steps=3)),
    # the paper's protocol: each batch mixed by MultiMix or by input mixup, decided from the callback's stream; with
    # seed 3 both halves of the run hold both kinds (input mixup, MultiMix, MultiMix, input mixup)
    "protocol": dict(n_tuples=6, seed=3, probability=0.5),
    "protocol-distill": dict(n_tuples=6, seed=3, probability=0.5,
                             distill=SelfDistillation(ema_decay=0.9, warmup_steps=3)),
}


def _fit(config, max_steps, tmp_path=None, ckpt_path=None, global_seed=0):
    torch.manual_seed(global_seed)  # the model's initialisation and, through it, the drawn base seed
    model = TinyMLP(lr=0.1, momentum=0.9, batch_norm=True)
    callback = RecordingMultiMix(**config)
    callbacks = [callback]
    if tmp_path is not None:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}"))
    fit_trainer = trainer(callbacks, max_steps=max_steps, max_epochs=-1, enable_checkpointing=tmp_path is not None)
    fit_trainer.fit(model, loader(n=8, batch_size=4), ckpt_path=ckpt_path)
    return fit_trainer, model, callback


@pytest.mark.parametrize("mode", list(CONFIGS))
def test_two_plus_two_steps_equal_four_bit_for_bit(tmp_path, mode):
    config = CONFIGS[mode]
    full_trainer, full_model, full = _fit(config, max_steps=4)

    _, first_model, first = _fit(config, max_steps=2, tmp_path=tmp_path)
    checkpoint = tmp_path / "step=2.ckpt"
    assert checkpoint.exists(), sorted(p.name for p in tmp_path.iterdir())
    # a fresh process: other global RNG state, other initial weights, a new callback; all must come from the checkpoint
    resumed_trainer, resumed_model, resumed = _fit(config, max_steps=4, ckpt_path=str(checkpoint), global_seed=123)

    assert resumed_trainer.global_step == full_trainer.global_step == 4
    assert resumed.state_dict()["batches_seen"] == full.state_dict()["batches_seen"] == 4
    assert resumed.state_dict()["base_seed"] == first.state_dict()["base_seed"] == full.state_dict()["base_seed"]
    # the random stream: the resumed run drew the weights the uninterrupted run drew at batches 2 and 3
    assert len(first.weights) + len(resumed.weights) == len(full.weights)
    for drawn, expected in zip(first.weights + resumed.weights, full.weights):
        assert torch.equal(drawn, expected)
    if config.get("probability", 1.0) == 1.0:
        assert all(not torch.equal(a, b) for a, b in zip(full.weights[2:], full.weights[:2]))  # not a replay
    else:  # the protocol: both kinds of batch in the 4 steps, and the resumed run took the same decisions
        assert full.batch_counts["multimix"] == full.batch_counts["input_mixup"] == 2, full.batch_counts
        assert resumed.batch_counts["multimix"] == resumed.batch_counts["input_mixup"] == 1
        assert {k: first.batch_counts[k] + resumed.batch_counts[k] for k in full.batch_counts} == full.batch_counts
    assert len(first.step_losses) + len(resumed.step_losses) == len(full.step_losses) == 4
    for loss, expected in zip(first.step_losses + resumed.step_losses, full.step_losses):
        assert torch.equal(loss, expected)
    # the weights (and batch-norm buffers), hence the optimizer's momentum too
    full_state, resumed_state = full_model.state_dict(), resumed_model.state_dict()
    for key in full_state:
        assert torch.equal(resumed_state[key], full_state[key]), key
    assert not torch.equal(first_model.fc.weight, full_model.fc.weight)  # 2 steps are not 4: the comparison can fail

    if config.get("distill"):
        assert resumed.teacher.num_updates == full.teacher.num_updates == 4
        assert resumed.distiller.last_update_step == full.distiller.last_update_step == 4
        full_teacher, resumed_teacher = full.teacher.module.state_dict(), resumed.teacher.module.state_dict()
        for key in full_teacher:
            assert torch.equal(resumed_teacher[key], full_teacher[key]), key
        assert not torch.equal(full_teacher["fc.weight"], full_state["fc.weight"])  # the teacher is not the student
