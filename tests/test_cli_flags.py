"""MultiMix from LightningCLI flags, on a tiny module in process: it is added with ``--trainer.callbacks+=``, its
arguments are flags with types and defaults, and invalid values fail with the callback's own message."""

import pytest

pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse: pip install 'lightning-multimix[cli]'")

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from helpers import TinyData, TinyMLP  # noqa: E402
from lightning_multimix import MultiMix  # noqa: E402

ADD = ["--trainer.callbacks+=lightning_multimix.MultiMix", "--trainer.callbacks.n_tuples=500"]


def cli(*args: str) -> LightningCLI:
    return LightningCLI(TinyMLP, TinyData, args=list(args))


def test_flags_add_the_callback_and_fit(tmp_path):
    quiet = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.max_steps=2", "--trainer.logger=false",
             "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
             f"--trainer.default_root_dir={tmp_path}"]
    result = cli("fit", *ADD, "--trainer.callbacks.alpha=0.5", *quiet)
    callbacks = [c for c in result.trainer.callbacks if isinstance(c, MultiMix)]
    assert len(callbacks) == 1
    assert (callbacks[0].n_tuples, callbacks[0].alpha, callbacks[0].mode) == (500, 0.5, "multimix")
    assert result.trainer.global_step == 2
    assert "multimix/loss" in result.trainer.callback_metrics  # it trained on the MultiMix loss


def test_print_config_shows_every_argument_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli("fit", *ADD, "--print_config")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "class_path: lightning_multimix.MultiMix" in out
    for line in ("n_tuples: 500", "alpha: 1.0", "mode: multimix", "tuple_size: null", "seed: null", "dense: false",
                 "distill: false", "ema_decay: 0.999", "sync_batch: false", "check_every_n_steps: 50"):
        assert f"      {line}\n" in out, line


def test_callback_help_shows_types_and_defaults(capsys):
    with pytest.raises(SystemExit):
        cli("fit", "--trainer.callbacks.help", "lightning_multimix.MultiMix")
    out = " ".join(capsys.readouterr().out.split())  # undo the help's line wrapping
    for text in ("--trainer.callbacks.n_tuples N_TUPLES", "(type: int, default: 1000)",
                 "--trainer.callbacks.mode {multimix,pairs}", "(type: Literal['multimix', 'pairs'], default: multimix)",
                 "--trainer.callbacks.sync_batch {true,false}", "(type: Optional[int], default: null)"):
        assert text in out, text


def test_invalid_flag_value_fails_with_the_callbacks_message(capsys):
    with pytest.raises((SystemExit, ValueError)) as error:
        cli("fit", "--trainer.callbacks+=lightning_multimix.MultiMix", "--trainer.callbacks.n_tuples=0",
            "--trainer.accelerator=cpu", "--trainer.logger=false")
    message = str(error.value) + capsys.readouterr().err
    assert "n_tuples=0" in message and "e.g. 1000" in message
