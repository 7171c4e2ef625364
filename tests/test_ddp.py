"""MultiMix under DDP on 2 CPU processes (gloo): ``strategy="ddp"`` and ``"ddp_spawn"``, every mode, and ``sync_batch``.

``strategy="ddp"`` re-launches the running script once per extra process, so it runs in a script of its own (a pytest
process would be re-launched whole); ``"ddp_spawn"`` runs from the test (it pickles the module and the callbacks into
the spawned processes, which is the pickling the callback must not break). Each process writes what it saw to
``rank{r}.pt`` (see ``helpers.RecordingMultiMix``), and the tests compare the processes.
"""

from pathlib import Path

import pytest
import torch

import helpers
from helpers import MODES, TinyMLP, hand_multimix_loss, run_script, sync_weights
from lightning_multimix.sampling import dirichlet_weights, seed_uniform, step_seed

pytestmark = pytest.mark.slow
STEPS = 3


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory) -> Path:
    """One script, 2 processes, several fits in a row (the processes and the process group are reused): every mode
    (``modes/``) and the sync_batch equivalence runs (``sync/``)."""
    out = tmp_path_factory.mktemp("ddp")
    script = out / "fit_ddp.py"
    script.write_text(
        "import sys\nimport helpers\n"
        "helpers.fit_modes('ddp', sys.argv[1] + '/modes', steps=int(sys.argv[2]))\n"
        "helpers.fit_sync('ddp', sys.argv[1] + '/sync')\n"
        "helpers.fit_unequal('ddp', sys.argv[1])\n"
        "helpers.destroy_process_group()\n"
    )
    run_script(script, str(out), str(STEPS))
    return out


@pytest.fixture(scope="module")
def spawn_out(tmp_path_factory) -> Path:
    """Every mode but the sync_batch ones under ddp_spawn: each fit spawns two fresh interpreters, so sync_batch (whose
    arithmetic does not depend on how the processes were started) runs under ddp only."""
    out = tmp_path_factory.mktemp("ddp_spawn")
    modes = tuple(mode for mode in MODES if not MODES[mode].get("sync_batch"))
    helpers.fit_modes("ddp_spawn", str(out / "modes"), modes=modes, steps=STEPS)
    return out


# (strategy, mode) pairs: every mode under both strategies, but sync_batch under ddp only (see spawn_out);
# "sync_probability" has its own test (not every batch is mixed)
CASES = [(strategy, mode) for strategy in ("ddp", "ddp_spawn") for mode in MODES
         if mode != "sync_probability" and not (strategy == "ddp_spawn" and MODES[mode].get("sync_batch"))]
TEACHER_CASES = [(strategy, mode) for strategy, mode in CASES if MODES[mode].get("distill")]


def _run(request, strategy: str, mode: str) -> dict:
    """``{"records": [rank 0's, rank 1's], "clean": [...]}`` of one 2-process fit (3 steps, batches of 4 per
    process); see ``helpers.fit_modes``."""
    return _load(request.getfixturevalue("ddp_out" if strategy == "ddp" else "spawn_out") / "modes" / mode)


def _rows(mode: str) -> int:
    return 8 if MODES[mode].get("sync_batch") else 4  # the batch mixed: 4 per process, or the global batch


def _load(folder: Path) -> dict:
    records = [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    clean = [(folder / f"clean{rank}.txt").read_text() for rank in range(2)]
    return {"records": records, "clean": clean}


@pytest.mark.parametrize("strategy, mode", CASES)
def test_trains_on_two_processes(request, strategy, mode):
    r0, r1 = _run(request, strategy, mode)["records"]
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


@pytest.mark.parametrize("strategy, mode", CASES)
def test_module_is_clean_and_picklable_after_fit(request, strategy, mode):
    # written by helpers.CleanModuleCheck, in the process that trained (a spawned one under ddp_spawn), after
    # MultiMix's teardown; it pickled the module there and found no hook and no wrapped training_step
    assert _run(request, strategy, mode)["clean"] == ["hooks=[] attributes=[]"] * 2


@pytest.mark.parametrize("strategy, mode", CASES)
def test_each_process_draws_its_own_weights(request, strategy, mode):
    r0, r1 = _run(request, strategy, mode)["records"]
    # one base seed for the job (broadcast from rank 0), then a stream per (rank, batch)
    assert r0["base_seed"] == r1["base_seed"]
    for step in range(STEPS):
        assert not torch.allclose(r0["weights"][step], r1["weights"][step])
        for record in (r0, r1):
            seed = step_seed(record["base_seed"], record["rank"], step)
            generator = torch.Generator().manual_seed(seed)
            expected = dirichlet_weights(_rows(mode), MODES[mode]["n_tuples"], generator=generator)
            torch.testing.assert_close(record["weights"][step], expected, rtol=0, atol=0)


@pytest.mark.parametrize("strategy, mode", TEACHER_CASES)
def test_teacher_is_identical_across_processes(request, strategy, mode):
    r0, r1 = _run(request, strategy, mode)["records"]
    assert r0["teacher_updates"] == r1["teacher_updates"] == STEPS
    teacher0, teacher1 = r0["teacher"], r1["teacher"]
    # parameters and batch-norm buffers alike (the processes' own statistics differ: see test_trains_on_two_processes)
    assert "net.1.running_mean" in teacher0
    for key in teacher0:
        torch.testing.assert_close(teacher0[key], teacher1[key], rtol=0, atol=0, msg=key)
    # and it is a teacher, not a copy of the student: the EMA lags behind
    assert not torch.allclose(teacher0["fc.weight"], r0["model"]["fc.weight"])


# ---------------------------------------------------------------------------------------------------- sync_batch


@pytest.mark.parametrize("logit_space", ["auto", "never"])
def test_sync_batch_equals_one_process_on_the_global_batch(ddp_out, logit_space):
    """2 processes on batches A and B with sync_batch=True, rank r mixing the global batch with its own W_r (2b x n),
    give the loss and the (DDP-averaged) gradients of one process on [A; B] with W = [W_0 | W_1] (2b x 2n).

    ``logit_space="auto"`` gathers the head's logits (linear head), ``"never"`` the embeddings, on which each rank then
    runs the head: the gradients reach the encoder through the gradient-carrying all-gather either way."""
    folder = ddp_out / "sync" / logit_space
    fixed = sync_weights()
    r0, r1 = (torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(2))
    initial = TinyMLP()
    initial.load_state_dict(torch.load(folder / "initial.pt"))

    (xa, ya), (xb, yb) = r0["batches"][0], r1["batches"][0]
    assert not torch.equal(xa, xb)
    assert all(torch.equal(w, fixed[r["rank"]]) for r in (r0, r1) for w in r["weights"])  # the known weights were used
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
        torch.testing.assert_close(r0["grads"][name], param.grad, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(r1["grads"][name], param.grad, msg=lambda m: f"{name}: {m}")


def test_sync_batch_processes_take_the_same_mixing_decision(ddp_out):
    """With ``probability < 1`` each batch is mixed or not; under sync_batch all processes must take rank 0's decision
    (they all take part in the gather: a process that skipped it would leave the others waiting forever)."""
    r0, r1 = _load(ddp_out / "modes" / "sync_probability")["records"]
    config = MODES["sync_probability"]
    decisions = {rank: [seed_uniform(step_seed(config["seed"], rank, step)) < config["probability"]
                        for step in range(STEPS)] for rank in range(2)}
    assert decisions[0] != decisions[1]  # the processes' own streams disagree: the test can fail
    mixed = [step for step, mix in enumerate(decisions[0]) if mix]
    assert 0 < len(mixed) < STEPS
    for record in (r0, r1):
        assert record["global_step"] == record["batches_seen"] == STEPS
        assert len(record["losses"]) == len(record["weights"]) == len(mixed)
        assert all(w.shape == (8, config["n_tuples"]) for w in record["weights"])  # the global batch
    assert not torch.allclose(r0["weights"][0], r1["weights"][0])  # each its own weights, still
    # the other batches were mixed in input space (the protocol's default), on every process alike
    expected = {"multimix": len(mixed), "input_mixup": STEPS - len(mixed), "pairs": 0, "own_loss": 0}
    assert r0["batch_counts"] == r1["batch_counts"] == expected


def test_sync_batch_with_unequal_batch_sizes_stops_with_a_clear_error_on_every_process(ddp_out):
    """Rank 0's second batch has 4 examples, rank 1's 2: gathering them would abort gloo natively. Every process
    raises MultiMixError naming the sizes, at the same step."""
    for rank in (0, 1):
        message = (ddp_out / f"unequal{rank}.txt").read_text()
        assert message.startswith("MultiMixError") and "sizes are [4, 2]" in message and "drop_last=True" in message
