"""Tiny LightningModules, data and a recording MultiMix shared by the production-training tests.

Everything here lives at module level so that it pickles (``ddp_spawn`` sends the module and the callbacks to the
spawned processes by pickling them) and can be imported by the scripts that ``strategy="ddp"`` re-launches
(``sys.path`` must contain this folder: :func:`run_script` sees to it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_multimix import Dense, MultiMix, SelfDistillation
from lightning_multimix.sampling import dirichlet_weights

NUM_CLASSES, DIM, HIDDEN = 3, 6, 8
TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent


# ---------------------------------------------------------------------------------------------------- data


def tensors(n: int = 16, seed: int = 0, image: bool = False) -> tuple[Tensor, Tensor]:
    """``n`` random inputs (``(n, DIM)``, or ``(n, 2, 4, 4)`` images) and labels in ``[0, NUM_CLASSES)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 4, 4, generator=g) if image else torch.randn(n, DIM, generator=g)
    return x, torch.randint(0, NUM_CLASSES, (n,), generator=g)


def loader(n: int = 16, batch_size: int = 4, seed: int = 0, image: bool = False, labels: Optional[Tensor] = None,
           **kwargs: Any) -> DataLoader:
    """A deterministic loader (no shuffling: the order is the dataset's, identical in every run and every epoch)."""
    x, y = tensors(n, seed, image)
    return DataLoader(TensorDataset(x, y if labels is None else labels), batch_size=batch_size, **kwargs)


class TinyData(L.LightningDataModule):
    """``loader()`` as a datamodule (for LightningCLI)."""

    def __init__(self, n: int = 16, batch_size: int = 4, image: bool = False) -> None:
        super().__init__()
        self.n, self.batch_size, self.image = n, batch_size, image

    def train_dataloader(self) -> DataLoader:
        return loader(self.n, self.batch_size, image=self.image)


# ---------------------------------------------------------------------------------------------------- modules


class TinyMLP(L.LightningModule):
    """A user's module: an encoder, a linear head ``fc``, ordinary cross-entropy, SGD."""

    def __init__(self, lr: float = 0.1, momentum: float = 0.0, batch_norm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(DIM, HIDDEN)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(HIDDEN))
        self.net = nn.Sequential(*layers, nn.Tanh())
        self.fc = nn.Linear(HIDDEN, NUM_CLASSES)
        self.lr, self.momentum = lr, momentum

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.net(x))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class TinyCNN(TinyMLP):
    """A conv encoder ending in a global average pool (the feature map dense MultiMix finds), then ``fc``."""

    def __init__(self, lr: float = 0.1, momentum: float = 0.0, batch_norm: bool = False) -> None:
        super().__init__(lr, momentum)
        layers: list[nn.Module] = [nn.Conv2d(2, HIDDEN, 3, padding=1)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(HIDDEN))
        self.net = nn.Sequential(*layers, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


# ---------------------------------------------------------------------------------------------------- callbacks


class RecordingMultiMix(MultiMix):
    """MultiMix that records, per training batch, the weight matrix it drew and the loss it returned.

    With ``fixed`` (a ``{rank: (m, n) tensor}`` dict) it uses those weights instead of drawing them. With ``out_dir``
    it saves what it recorded, the teacher's state and the module's gradients of the first batch, one file per rank
    (``rank{r}.pt``), at the end of fit: the way to look at every process of a DDP run from the test.
    """

    def __init__(self, *args: Any, fixed: Optional[dict[int, Tensor]] = None, out_dir: Optional[str] = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("probability", 1.0)  # these tests are about the MultiMix batches; the protocol has its own
        super().__init__(*args, **kwargs)
        self.fixed, self.out_dir = fixed, out_dir
        self.weights: list[Tensor] = []
        self.losses: list[Tensor] = []
        self.step_losses: list[Tensor] = []  # what every training step returned, whichever way the batch was mixed
        self.grads: dict[str, Tensor] = {}
        self.batches: list[Any] = []
        self.rank = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.rank = trainer.global_rank

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if isinstance(batch, dict):
            self.batches.append({k: t.detach().cpu().clone() for k, t in batch.items()})
        else:
            self.batches.append([t.detach().cpu().clone() for t in batch])

    def sample_weights(self, num_examples: int, mode: str, generator: torch.Generator, keep=None) -> Tensor:
        device = generator.device
        if self.fixed is not None:
            weights = self.fixed[self.rank].to(device)
            assert weights.shape[0] == num_examples, (weights.shape, num_examples)
        else:
            weights = super().sample_weights(num_examples, mode, generator, keep)
        self.weights.append(weights.detach().cpu().clone())
        return weights

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        loss = outputs["loss"].detach().cpu().clone()
        self.step_losses.append(loss)
        mixed_at_last_layer = self.batch_counts["multimix"] + self.batch_counts["pairs"]
        if mixed_at_last_layer > len(self.losses):  # this batch was mixed at the last layer
            self.losses.append(loss)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        # after backward (and DDP's gradient averaging), before clipping and the update
        if not self.grads:
            self.grads = {k: p.grad.detach().cpu().clone() for k, p in pl_module.named_parameters()}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.out_dir is not None:
            torch.save(self.record(trainer, pl_module), Path(self.out_dir) / f"rank{trainer.global_rank}.pt")

    def record(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "base_seed": self.state_dict()["base_seed"],
            "batches_seen": self.state_dict()["batches_seen"],
            "global_step": trainer.global_step,
            "weights": self.weights,
            "losses": self.losses,
            "step_losses": self.step_losses,
            "batch_counts": dict(self.batch_counts),
            "grads": self.grads,
            "batches": self.batches,
            "model": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
            "teacher": None if self.teacher is None else
            {k: v.detach().cpu().clone() for k, v in self.teacher.module.state_dict().items()},
            "teacher_updates": None if self.teacher is None else self.teacher.num_updates,
        }


# ---------------------------------------------------------------------------------------------------- trainers


def trainer(callbacks: Any = (), **kwargs: Any) -> L.Trainer:
    """A quiet CPU trainer: no logger, checkpointing, progress bar or summary unless asked for."""
    defaults = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, accelerator="cpu", devices=1)
    return L.Trainer(callbacks=list(callbacks), **{**defaults, **kwargs})


def run_script(path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``python path args`` with this folder importable, raising with its output if it fails.

    ``strategy="ddp"`` re-launches the running script once per extra process, so a DDP run must be a script of its
    own, not a pytest process (which would be re-launched whole).
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    # its own session, so that a hung job (a deadlocked collective) is killed whole, the processes it launched too
    process = subprocess.Popen([sys.executable, str(path), *args], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=str(path.parent), start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"{path.name} did not finish in {timeout} s (killed):\n{stdout[-4000:]}\n{stderr[-8000:]}")
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if result.returncode != 0:
        output = f"{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        raise AssertionError(f"{path.name} failed ({result.returncode}):\n{output}")
    return result


def hand_multimix_loss(logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """The MultiMix loss written out: ``mean_k -sum_c (Y^T w_k)_c log softmax(L^T w_k)_c`` (logit space)."""
    targets = (labels[:, None] == torch.arange(logits.shape[1])[None]).float()
    mixed_logits = weights.T @ logits
    mixed_targets = weights.T @ targets
    return -(mixed_targets * torch.log_softmax(mixed_logits, dim=1)).sum(1).mean()


# ---------------------------------------------------------------------------------------------------- DDP runs

MODES = {
    "plain": dict(n_tuples=7),
    "dense": dict(n_tuples=7, dense=Dense()),
    # a fast teacher (decay 0.5, no warm-up of beta) so that it departs from the student within a few steps
    "distill": dict(n_tuples=7, distill=SelfDistillation(ema_decay=0.5, ema_warmup=False, warmup_steps=0)),
    # the global batch: features, labels, targets and the teacher's logits gathered from both processes
    "sync": dict(n_tuples=7, sync_batch=True, dense=Dense(), distill=SelfDistillation(ema_decay=0.5, warmup_steps=0)),
    # whether a batch is mixed is drawn per batch; with sync_batch every process must take the same decision (they
    # all take part in the gather). With seed 3 rank 0's stream mixes batch 1 only and rank 1's would mix 0 and 1.
    "sync_probability": dict(n_tuples=7, sync_batch=True, probability=0.5, seed=3),
}


class CleanModuleCheck(L.Callback):
    """Placed after MultiMix: at teardown (MultiMix's has run) checks the module carries nothing MultiMix installed
    and pickles, in the process that trained it (a spawned one under ``ddp_spawn``), and writes ``clean{rank}.txt``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import pickle

        hooks = [name for name, m in pl_module.named_modules() if m._forward_hooks or m._forward_pre_hooks]
        leftovers = [k for k in ("training_step",) if k in pl_module.__dict__]
        pickle.loads(pickle.dumps(pl_module))  # raises if it does not pickle
        Path(self.out_dir, f"clean{trainer.global_rank}.txt").write_text(f"hooks={hooks} attributes={leftovers}")


def fit_modes(strategy: str, out_dir: str, modes: tuple[str, ...] = tuple(MODES), steps: int = 3) -> None:
    """Fit each mode for ``steps`` steps on 2 CPU processes; each rank writes ``out_dir/<mode>/rank{r}.pt``.

    Each process builds its module from its own seed (as a script launched per process does without
    ``seed_everything``): DDP must broadcast rank 0's weights, and the teacher must be copied after that.
    """
    for mode in modes:
        rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.manual_seed(100 + rank)
        dense = MODES[mode].get("dense", False)
        model = (TinyCNN if dense else TinyMLP)(lr=0.2, batch_norm=True)
        mode_dir = Path(out_dir, mode)
        mode_dir.mkdir(parents=True, exist_ok=True)
        callbacks = [RecordingMultiMix(**MODES[mode], out_dir=str(mode_dir)), CleanModuleCheck(str(mode_dir))]
        fit_trainer = trainer(callbacks, devices=2, strategy=strategy, max_steps=steps, max_epochs=-1)
        fit_trainer.fit(model, loader(n=16, batch_size=4, image=dense))


SYNC_B, SYNC_N = 4, 5


def sync_weights() -> dict[int, Tensor]:
    """The known weight matrices of the sync_batch test: rank r mixes the global batch (2b rows) into n tuples."""
    g = torch.Generator().manual_seed(7)
    return {rank: dirichlet_weights(2 * SYNC_B, SYNC_N, alpha=0.5, generator=g) for rank in range(2)}


def fit_sync(strategy: str, out_dir: str, logit_spaces: tuple[str, ...] = ("auto", "never")) -> None:
    """One step with ``sync_batch=True`` and the known weights, per ``logit_space``; each rank writes
    ``out_dir/<logit_space>/rank{r}.pt`` and rank 0 the initial weights (``initial.pt``)."""
    for logit_space in logit_spaces:
        torch.manual_seed(0)
        model = TinyMLP(lr=0.1)
        folder = Path(out_dir, logit_space)
        folder.mkdir(parents=True, exist_ok=True)
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            torch.save(model.state_dict(), folder / "initial.pt")
        callback = RecordingMultiMix(n_tuples=SYNC_N, sync_batch=True, logit_space=logit_space, fixed=sync_weights(),
                                     out_dir=str(folder))
        sync_trainer = trainer([callback], devices=2, strategy=strategy, max_steps=1)
        sync_trainer.fit(model, loader(n=2 * SYNC_B, batch_size=SYNC_B))


def destroy_process_group() -> None:
    """End a DDP script with this: a gloo process group left alive at exit sometimes aborts the process
    ("terminate called without an active exception", exit code -6) after everything ran, about 1 run in 5 here."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def fit_unequal(strategy: str, out_dir: str) -> None:
    """sync_batch with batches of different sizes on the two processes (rank 0: 8 examples, rank 1: 6; batches of 4,
    no distributed sampler): each rank writes what stopped it to ``out_dir/unequal{rank}.txt``."""
    rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.manual_seed(0)
    callback = MultiMix(n_tuples=5, probability=1.0, sync_batch=True, seed=0)
    fit_trainer = trainer([callback], devices=2, strategy=strategy, max_steps=4, max_epochs=-1,
                          use_distributed_sampler=False)
    try:
        fit_trainer.fit(TinyMLP(), loader(n=8 if rank == 0 else 6, batch_size=4))
        message = "no error"
    except Exception as error:  # noqa: BLE001 - the test reads what it was
        message = f"{type(error).__name__}: {error}"
    Path(out_dir, f"unequal{rank}.txt").write_text(message)
