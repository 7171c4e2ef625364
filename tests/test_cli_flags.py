"""MultiMix from LightningCLI flags, on a tiny module in process: it is added with ``--trainer.callbacks+=``, its
arguments are flags with types and defaults, and invalid values fail with the callback's own message."""

import pytest

pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse: pip install 'lightning-multimix[cli]'")

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from helpers import TinyCNN, TinyData, TinyMLP  # noqa: E402
from lightning_multimix import Dense, MultiMix, SelfDistillation  # noqa: E402

ADD = ["--trainer.callbacks+=lightning_multimix.MultiMix", "--trainer.callbacks.n_tuples=500"]
QUIET = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.max_steps=2", "--trainer.logger=false",
         "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false"]


def cli(*args: str, model: type = TinyMLP) -> LightningCLI:
    return LightningCLI(model, TinyData, args=list(args))


def test_flags_add_the_callback_and_fit(tmp_path):
    result = cli("fit", *ADD, "--trainer.callbacks.alpha=0.5", *QUIET, f"--trainer.default_root_dir={tmp_path}")
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
    for line in ("n_tuples: 500", "alpha: null", "mode: multimix", "tuple_size: null", "probability: 0.5",
                 "other_batches: null", "mixup_alpha: null", "seed: null", "dense: null", "distill: null",
                 "sync_batch: false", "check_every_n_steps: 50"):
        assert f"      {line}\n" in out, line


def test_nested_mode_options_from_flags(tmp_path):
    """The dense and self-distillation options are typed objects: their fields are flags of their own."""
    result = cli("fit", *ADD, "--trainer.callbacks.dense.attention=softmax", "--trainer.callbacks.distill.weight=0.3",
                 "--trainer.callbacks.distill.ema_decay=0.9", "--data.image=true", *QUIET,
                 f"--trainer.default_root_dir={tmp_path}", model=TinyCNN)
    (callback,) = [c for c in result.trainer.callbacks if isinstance(c, MultiMix)]
    assert callback.dense == Dense(attention="softmax")
    assert callback.distill == SelfDistillation(weight=0.3, ema_decay=0.9)
    assert callback.teacher is not None and result.trainer.global_step == 2


def test_nested_mode_options_from_yaml(tmp_path):
    config = tmp_path / "multimix.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning_multimix.MultiMix\n"
        "      init_args:\n"
        "        n_tuples: 200\n"
        "        dense: {attention: uniform}\n"
        "        distill:\n"
        "          weight: 0.25\n"
        "          targets: probs\n"
    )
    result = cli("fit", f"--config={config}", "--data.image=true", *QUIET, f"--trainer.default_root_dir={tmp_path}",
                 model=TinyCNN)
    (callback,) = [c for c in result.trainer.callbacks if isinstance(c, MultiMix)]
    assert (callback.n_tuples, callback.dense, callback.distill) == (200, Dense(attention="uniform"),
                                                                     SelfDistillation(weight=0.25))


def test_invalid_nested_value_fails_with_the_options_message(capsys):
    with pytest.raises((SystemExit, ValueError)) as error:
        cli("fit", *ADD, "--trainer.callbacks.distill.weight=2", *QUIET)
    message = str(error.value) + capsys.readouterr().err
    assert "weight=2" in message and "[0, 1]" in message


def test_callback_help_shows_types_and_defaults(capsys):
    with pytest.raises(SystemExit):
        cli("fit", "--trainer.callbacks.help", "lightning_multimix.MultiMix")
    out = " ".join(capsys.readouterr().out.split())  # undo the help's line wrapping
    for text in ("--trainer.callbacks.n_tuples N_TUPLES", "(type: Optional[int], default: null)",
                 "--trainer.callbacks.mode {multimix,pairs}", "(type: Literal['multimix', 'pairs'], default: multimix)",
                 "--trainer.callbacks.sync_batch {true,false}", "--trainer.callbacks.probability PROBABILITY",
                 "(type: float, default: 0.5)", "--trainer.callbacks.dense DENSE",
                 "(type: Optional[Dense], default: null)", "Show the help for SelfDistillation and exit."):
        assert text in out, text


def test_nested_options_help(capsys):
    with pytest.raises(SystemExit):
        cli("fit", "--trainer.callbacks.help", "lightning_multimix.MultiMix", "--trainer.callbacks.distill.help")
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--trainer.callbacks.distill.weight WEIGHT", "(type: float, default: 0.5)",
                 "--trainer.callbacks.distill.targets {probs,logits}"):
        assert text in out, text


def test_invalid_flag_value_fails_with_the_callbacks_message(capsys):
    with pytest.raises((SystemExit, ValueError)) as error:
        cli("fit", "--trainer.callbacks+=lightning_multimix.MultiMix", "--trainer.callbacks.n_tuples=0",
            "--trainer.accelerator=cpu", "--trainer.logger=false")
    message = str(error.value) + capsys.readouterr().err
    assert "n_tuples=0" in message and "e.g. 1000" in message
