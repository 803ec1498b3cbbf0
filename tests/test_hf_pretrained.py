"""Hugging Face callback checkpoints load the way users load models: from_pretrained, and `ckpt export --to hf`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM, GenerationConfig, Trainer  # noqa: E402

from ckpt_plugin import CheckpointManager  # noqa: E402
from ckpt_plugin.hf import CheckpointCallback  # noqa: E402
from ckpt_plugin._storage import checksum_bytes  # noqa: E402
from test_hf import Tokens, make_trainer, tiny_gpt2  # noqa: E402

typer_testing = pytest.importorskip("typer.testing")
from ckpt_plugin.cli import app  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short run with the callback (2 epochs, keeps both), shared by the tests below."""
    out = tmp_path_factory.mktemp("hf-run")
    trainer, callback = make_trainer(out, num_train_epochs=2, save_total_limit=3)
    trainer.train()
    return out, trainer, callback


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.arange(16).reshape(1, 16)).logits


def test_every_checkpoint_and_its_link_load_with_from_pretrained(trained):
    out, trainer, callback = trained
    checkpoints = callback.manager.checkpoints()
    assert len(checkpoints) == 2
    links = [name for name in os.listdir(out) if name.startswith("checkpoint-")]
    assert len(links) == 1
    for path in [info.path for info in checkpoints] + [out / links[0]]:
        model = AutoModelForCausalLM.from_pretrained(path)
        state = CheckpointManager(out).load(int(Path(os.path.realpath(path)).name.split("_")[1]))["model"]
        expected = tiny_gpt2(0)
        expected.load_state_dict(state)
        assert torch.equal(_logits(model), _logits(expected)), path
        assert GenerationConfig.from_pretrained(path).to_dict() == expected.generation_config.to_dict()


def test_config_files_are_byte_identical_to_save_pretrained_and_checksummed(trained, tmp_path):
    out, trainer, callback = trained
    latest = callback.manager.latest()
    trainer.model.save_pretrained(tmp_path / "reference")
    for name in ("config.json", "generation_config.json"):
        data = (latest.path / name).read_bytes()
        assert data == (tmp_path / "reference" / name).read_bytes(), name
        assert latest.files[name].checksum == checksum_bytes(data)  # committed and verified like any file
    assert json.loads((latest.path / "config.json").read_bytes())["architectures"] == ["GPT2LMHeadModel"]


def test_the_trainer_evaluates_a_checkpoint_loaded_with_from_pretrained(trained):
    out, trainer, callback = trained
    best = callback.manager.best()
    model = AutoModelForCausalLM.from_pretrained(best.path)
    evaluator = Trainer(model=model, args=trainer.args, eval_dataset=Tokens(16, 2))
    metrics = evaluator.evaluate()
    assert metrics["eval_loss"] == pytest.approx(best.metrics["eval_loss"], rel=1e-5)


def test_export_to_hf_writes_the_models_own_config(trained, tmp_path):
    out, _, callback = trained
    result = typer_testing.CliRunner().invoke(app, ["export", str(out), "best", "--to", "hf", "-o", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "config.json").read_bytes() == (callback.manager.best().path / "config.json").read_bytes()
    assert (tmp_path / "m" / "generation_config.json").is_file()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").config.n_embd == 32


def test_export_to_hf_uses_the_recorded_model_config_of_older_checkpoints(tmp_path):
    """Checkpoints written before config.json was added record the model config under "model"."""
    model = tiny_gpt2(0)
    config = {"model": model.config.to_dict(), "training_args": {"output_dir": "out"}}
    CheckpointManager(tmp_path / "run").save(model, epoch=1, config=config)
    result = typer_testing.CliRunner().invoke(app, ["export", str(tmp_path / "run"), "latest", "--to", "hf", "-o", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.equal(_logits(loaded), _logits(model))


def test_export_to_hf_refuses_a_checkpoint_without_a_model_config(tmp_path):
    CheckpointManager(tmp_path / "run").save(torch.nn.Linear(2, 2), epoch=1, config={"lr": 0.1})
    result = typer_testing.CliRunner().invoke(app, ["export", str(tmp_path / "run"), "latest", "--to", "hf", "-o", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert "--config" in result.output and "model_type" in result.output
    assert not (tmp_path / "m").exists()


def test_sharded_incremental_checkpoints_load_with_from_pretrained(tmp_path):
    trainer, callback = make_trainer(tmp_path, num_train_epochs=1, callback=CheckpointCallback(incremental=True))
    trainer.train()
    latest = callback.manager.latest()
    assert "model.safetensors.index.json" in latest.files and "model.safetensors" not in latest.files
    loaded = AutoModelForCausalLM.from_pretrained(latest.path)
    expected = tiny_gpt2(0)
    expected.load_state_dict(CheckpointManager(tmp_path).load_latest()["model"])
    assert torch.equal(_logits(loaded), _logits(expected))
