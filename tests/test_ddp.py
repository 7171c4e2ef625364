"""MultiMix under DDP on 2 CPU processes (gloo): ``strategy="ddp"`` and ``"ddp_spawn"``, every mode, and ``sync_batch``.

``strategy="ddp"`` re-launches the running script once per extra process, so it runs in a script of its own (a pytest
process would be re-launched whole); ``"ddp_spawn"`` runs from the test (it pickles the module and the callbacks into
the spawned processes, which is the pickling the callback must not break). Each process writes what it saw to
``rank{r}.pt`` (see ``helpers.RecordingMultiMix``), and the tests compare the processes.
"""

import copy
from pathlib import Path

import pytest
import torch

import helpers
from helpers import MODES, RecordingMultiMix, TinyMLP, hand_multimix_loss, loader, run_script, trainer
from lightning_multimix.sampling import dirichlet_weights, step_seed

pytestmark = pytest.mark.slow
STEPS = 3


@pytest.fixture(scope="module", params=["ddp", "ddp_spawn"])
def runs(request, tmp_path_factory):
    """``{mode: {"records": [rank 0's, rank 1's], "clean": [...]}}`` of one 2-process fit per mode (3 steps, batches
    of 4 per process); see ``helpers.fit_modes``."""
    strategy = request.param
    out = tmp_path_factory.mktemp(strategy)
    if strategy == "ddp":
        script = out / "fit_ddp.py"
        script.write_text("import sys\nimport helpers\nhelpers.fit_modes('ddp', sys.argv[1], steps=int(sys.argv[2]))\n")
        run_script(script, str(out), str(STEPS))
        modes = tuple(MODES)
    else:
        # sync_batch runs under ddp_spawn in test_sync_batch_equals_one_process_on_the_global_batch; a spawn costs
        # two fresh interpreters, so it is not repeated here
        modes = tuple(m for m in MODES if m != "sync")
        helpers.fit_modes(strategy, str(out), modes=modes, steps=STEPS)
    return {mode: _load(out / mode) for mode in modes}


def _run(runs: dict, mode: str) -> dict:
    if mode not in runs:
        pytest.skip(f"mode {mode!r} is not run under this strategy (see the `runs` fixture)")
    return runs[mode]


def _rows(mode: str) -> int:
    return 8 if MODES[mode].get("sync_batch") else 4  # the batch mixed: 4 per process


def _load(folder: Path) -> dict:
    records = [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    clean = [(folder / f"clean{rank}.txt").read_text() for rank in range(2)]
    return {"records": records, "clean": clean}


@pytest.mark.parametrize("mode", list(MODES))
def test_trains_on_two_processes(runs, mode):
    r0, r1 = _run(runs, mode)["records"]
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    for record in (r0, r1):
        assert record["global_step"] == STEPS and record["batches_seen"] == STEPS
        assert len(record["losses"]) == STEPS and all(torch.isfinite(loss) for loss in record["losses"])
        # the loss trained on is the MultiMix one: n_tuples columns over the batch (the global one with sync_batch)
        assert all(w.shape == (_rows(mode), MODES[mode]["n_tuples"]) for w in record["weights"])
    # each process trained on its own shard of the data
    assert not torch.equal(r0["batches"][0][0], r1["batches"][0][0])
    # DDP kept the parameters identical (buffers are each process's own batch-norm statistics, as under plain DDP)
    params = [k for k in r0["grads"]]
    assert params and all(torch.equal(r0["model"][k], r1["model"][k]) for k in params)
    assert all(torch.equal(r0["grads"][k], r1["grads"][k]) for k in params)


@pytest.mark.parametrize("mode", list(MODES))
def test_module_is_clean_and_picklable_after_fit(runs, mode):
    # written by helpers.CleanModuleCheck, in the process that trained (a spawned one under ddp_spawn), after
    # MultiMix's teardown; it pickled the module there and found no hook and no wrapped training_step
    assert _run(runs, mode)["clean"] == ["hooks=[] attributes=[]"] * 2


@pytest.mark.parametrize("mode", list(MODES))
def test_each_process_draws_its_own_weights(runs, mode):
    r0, r1 = _run(runs, mode)["records"]
    # one base seed for the job (broadcast from rank 0), then a stream per (rank, batch)
    assert r0["base_seed"] == r1["base_seed"]
    for step in range(STEPS):
        assert not torch.allclose(r0["weights"][step], r1["weights"][step])
        for record in (r0, r1):
            seed = step_seed(record["base_seed"], record["rank"], step)
            generator = torch.Generator().manual_seed(seed)
            expected = dirichlet_weights(_rows(mode), MODES[mode]["n_tuples"], generator=generator)
            torch.testing.assert_close(record["weights"][step], expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["distill", "sync"])
def test_teacher_is_identical_across_processes(runs, mode):
    r0, r1 = _run(runs, mode)["records"]
    assert r0["teacher_updates"] == r1["teacher_updates"] == STEPS
    teacher0, teacher1 = r0["teacher"], r1["teacher"]
    # parameters and batch-norm buffers alike (the processes' own statistics differ: see test_trains_on_two_processes)
    assert "net.1.running_mean" in teacher0
    for key in teacher0:
        torch.testing.assert_close(teacher0[key], teacher1[key], rtol=0, atol=0, msg=key)
    # and it is a teacher, not a copy of the student: the EMA lags behind
    assert not torch.allclose(teacher0["fc.weight"], r0["model"]["fc.weight"])


# ---------------------------------------------------------------------------------------------------- sync_batch

B, N = 4, 5


@pytest.mark.parametrize("logit_space", ["auto", "never"])
def test_sync_batch_equals_one_process_on_the_global_batch(tmp_path, logit_space):
    """2 processes on batches A and B with sync_batch=True, rank r mixing the global batch with its own W_r (2b x n),
    give the loss and the (DDP-averaged) gradients of one process on [A; B] with W = [W_0 | W_1] (2b x 2n)."""
    g = torch.Generator().manual_seed(7)
    fixed = {rank: dirichlet_weights(2 * B, N, alpha=0.5, generator=g) for rank in range(2)}
    torch.manual_seed(0)
    model = TinyMLP(lr=0.1)
    initial = copy.deepcopy(model)
    callback = RecordingMultiMix(n_tuples=N, sync_batch=True, logit_space=logit_space, fixed=fixed,
                                 out_dir=str(tmp_path))
    trainer([callback], devices=2, strategy="ddp_spawn", max_steps=1).fit(model, loader(n=2 * B, batch_size=B))
    r0, r1 = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2))

    (xa, ya), (xb, yb) = r0["batches"][0], r1["batches"][0]
    assert not torch.equal(xa, xb)
    x, y = torch.cat([xa, xb]), torch.cat([ya, yb])
    logits = initial(x)
    # each rank's loss: its own n tuples over the global batch
    for rank, record in enumerate((r0, r1)):
        torch.testing.assert_close(record["losses"][0], hand_multimix_loss(logits, y, fixed[rank]).detach())
    # the job's loss (DDP averages the ranks' gradients): the mean of the two, one process with W = [W_0 | W_1]
    loss = hand_multimix_loss(logits, y, torch.cat([fixed[0], fixed[1]], dim=1))
    torch.testing.assert_close((r0["losses"][0] + r1["losses"][0]) / 2, loss.detach())
    loss.backward()
    for name, param in initial.named_parameters():
        torch.testing.assert_close(r0["grads"][name], param.grad, msg=name)
        torch.testing.assert_close(r1["grads"][name], param.grad, msg=name)
