"""After a fit under ``ddp_spawn`` the main process's callback holds what rank 0 ended with: the random
stream, the teacher, the EMA step and the batch counts come back with Lightning's own results from the workers, so a
checkpoint saved in the main process resumes like the uninterrupted run.

Lightning itself brings back the weights but not its loop counters or the optimizer's state: in the main process
``trainer.global_step`` is 0 after such a fit, and so is the checkpoint's. So the resumed run asks for 2 more steps
(not "up to 4"), SGD has no momentum, the distillation weight has no ramp (it follows ``global_step``), and the data
is the same in every epoch."""

from pathlib import Path

import pytest
import torch

from helpers import TinyMLP, loader, trainer
from lightning_multimix import MultiMix, SelfDistillation

pytestmark = pytest.mark.slow
OPTIONS = dict(n_tuples=6, seed=3, distill=SelfDistillation(ema_decay=0.9, warmup_steps=0))


def _fit(max_steps: int, ckpt_path=None):
    torch.manual_seed(0)
    model, callback = TinyMLP(lr=0.1), MultiMix(**OPTIONS)
    fit_trainer = trainer([callback], devices=2, strategy="ddp_spawn", max_steps=max_steps, max_epochs=-1,
                          use_distributed_sampler=False)
    # every epoch the same 2 batches on both processes: the data does not depend on the epoch the resumed run
    # believes it is in
    fit_trainer.fit(model, loader(n=8, batch_size=4), ckpt_path=ckpt_path)
    return fit_trainer, model, callback


def test_the_main_process_callback_holds_rank_zeros_state_and_its_checkpoint_resumes_exactly(tmp_path: Path):
    first_trainer, _, first = _fit(2)
    state = first.state_dict()
    assert state["batches_seen"] == 2 and state["last_ema_step"] == 2
    assert state["teacher"]["num_updates"] == 2 and sum(first.batch_counts.values()) == 2
    path = tmp_path / "two.ckpt"
    first_trainer.save_checkpoint(path)

    _, resumed_model, resumed = _fit(2, ckpt_path=str(path))
    _, full_model, full = _fit(4)
    assert resumed.state_dict()["batches_seen"] == full.state_dict()["batches_seen"] == 4
    for key, value in full_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key
    full_teacher, resumed_teacher = full.state_dict()["teacher"], resumed.state_dict()["teacher"]
    assert resumed_teacher["num_updates"] == full_teacher["num_updates"] == 4
    for key, value in full_teacher["module"].items():
        assert torch.equal(resumed_teacher["module"][key], value), key
