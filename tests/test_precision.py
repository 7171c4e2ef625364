"""Mixed precision, gradient accumulation and gradient clipping with MultiMix, against explicit computations.

The expected gradients are computed by hand (``helpers.hand_multimix_loss``) on a copy of the initial model, with the
weight matrices the callback recorded, then compared with the gradients Lightning handed to the optimizer.
"""

import copy

import pytest
import torch

from helpers import RecordingMultiMix, TinyCNN, TinyMLP, hand_multimix_loss, loader, trainer
from lightning_multimix import Dense, SelfDistillation

MODES = {"plain": {}, "dense": {"dense": Dense()}, "distill": {"distill": SelfDistillation()}}


class DtypeMLP(TinyMLP):
    """Records the dtype of the logits of its own forward (what autocast did to the user's step)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.logit_dtype = logits.dtype
        return torch.nn.functional.cross_entropy(logits, y)


@pytest.mark.parametrize("mode", list(MODES))
def test_bf16_mixed_trains_with_a_float32_loss(mode):
    torch.manual_seed(0)
    model = TinyCNN() if mode == "dense" else DtypeMLP()
    callback = RecordingMultiMix(n_tuples=5, **MODES[mode])
    fit_trainer = trainer([callback], max_steps=2, precision="bf16-mixed")
    fit_trainer.fit(model, loader(image=mode == "dense"))
    assert fit_trainer.precision == "bf16-mixed"
    if mode != "dense":
        assert model.logit_dtype == torch.bfloat16  # the user's forward ran under autocast
    assert len(callback.losses) == 2
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in callback.losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bf16_mixing_is_done_in_float32():
    """Under bf16 autocast the head's logits are bf16, but mixing them and the targets is float32 arithmetic (in 16
    bits the weights of a column would no longer sum to one: mixed targets summing to 0.996)."""
    torch.manual_seed(0)
    model = DtypeMLP(lr=0.0)
    initial = copy.deepcopy(model)
    callback = RecordingMultiMix(n_tuples=50)
    trainer([callback], max_steps=1, precision="bf16-mixed").fit(model, loader())
    x, y = callback.batches[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = initial(x)
    assert logits.dtype == torch.bfloat16
    expected = hand_multimix_loss(logits.float(), y, callback.weights[0])
    torch.testing.assert_close(callback.losses[0], expected, rtol=1e-6, atol=1e-6)


def test_16_mixed_trains_with_a_float32_loss():
    if not torch.cuda.is_available():
        pytest.skip("fp16 AMP needs a CUDA device: on CPU Lightning runs precision='16-mixed' as bf16-mixed")
    torch.manual_seed(0)
    model = DtypeMLP()
    callback = RecordingMultiMix(n_tuples=5, distill=SelfDistillation())
    fit_trainer = trainer([callback], accelerator="gpu", max_steps=3, precision="16-mixed", gradient_clip_val=1.0)
    fit_trainer.fit(model, loader())
    assert fit_trainer.precision == "16-mixed" and model.logit_dtype == torch.float16
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in callback.losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _hand_gradients(model, batches, weights, scale=1.0):
    model = copy.deepcopy(model)
    loss = sum(hand_multimix_loss(model(x), y, w) for (x, y), w in zip(batches, weights)) * scale
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_gradient_accumulation_averages_the_multimix_losses():
    torch.manual_seed(0)
    model = TinyMLP(lr=0.1)
    initial = copy.deepcopy(model)
    callback = RecordingMultiMix(n_tuples=6, distill=SelfDistillation(weight=0.0))  # distill: the teacher's step count
    fit_trainer = trainer([callback], max_steps=2, accumulate_grad_batches=4)
    fit_trainer.fit(model, loader(n=32, batch_size=4))
    assert len(callback.weights) == 8 and fit_trainer.global_step == 2
    # the gradient of the first optimizer step: the mean of the 4 batches' MultiMix losses (not their sum)
    expected = _hand_gradients(initial, callback.batches[:4], callback.weights[:4], scale=1 / 4)
    for name, grad in callback.grads.items():
        torch.testing.assert_close(grad, expected[name], msg=name)
    # one EMA update per optimizer step, not per batch
    assert callback.teacher.num_updates == 2


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_clips_the_multimix_gradient(algorithm):
    clip = 0.05
    torch.manual_seed(0)
    model = TinyMLP(lr=1.0)  # SGD, lr 1, no momentum: the update is minus the clipped gradient
    initial = copy.deepcopy(model)
    callback = RecordingMultiMix(n_tuples=6)
    trainer([callback], max_steps=1, gradient_clip_val=clip, gradient_clip_algorithm=algorithm).fit(model, loader())
    grads = _hand_gradients(initial, callback.batches, callback.weights)
    for name, grad in callback.grads.items():  # before clipping: the MultiMix gradient
        torch.testing.assert_close(grad, grads[name], msg=name)
    total_norm = torch.cat([g.flatten() for g in grads.values()]).norm()
    assert total_norm > 2 * clip and max(g.abs().max() for g in grads.values()) > 2 * clip  # clipping bites
    for name, param in model.named_parameters():
        if algorithm == "norm":
            clipped = grads[name] * clip / (total_norm + 1e-6)
        else:
            clipped = grads[name].clamp(-clip, clip)
        torch.testing.assert_close(initial.get_parameter(name) - param.detach(), clipped, msg=name)
