"""Data never names code: nothing a checkpoint holds is imported, built or unpickled.

- ``ckpt_plugin.lightning.load_from_checkpoint`` passes hyper-parameters as plain data: the keys
  through which LightningCLI names code (``_instantiator``, ``_class_path``, ``class_path`` and
  ``init_args``) are refused with a ``CheckpointError``, unless the caller lists the classes.
- The HF Trainer resumes from ``checkpoint-<step>`` by reading that directory itself and
  ``torch.load``-ing what it finds there (``rng_state.pth``, ``optimizer.pt``, ...). Such files are
  planted as bytes that no unpickler accepts: were any handed to ``torch.load``, the error would be
  an unpickling error, not the ``ForeignFileError`` the callback raises before the Trainer reads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("transformers")

from ckpt_plugin import CheckpointError, CheckpointManager, ForeignFileError, IncompatibleCheckpointError, cli  # noqa: E402
from ckpt_plugin.lightning import load_from_checkpoint  # noqa: E402

NOT_A_PICKLE = b"this is not a pickle: torch.load would fail on it\n"
ALLOWED_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"  # the one Lightning's loader trusts


class Encoder(torch.nn.Module):
    def __init__(self, width: int = 2) -> None:
        super().__init__()
        self.width = width


class Net(pl.LightningModule):
    """Accepts any keyword, so hyper-parameters that leak through would show in ``extra``."""

    def __init__(self, width: int = 2, encoder: Any = None, activation: Any = None, **extra: Any) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(width, width)
        self.encoder, self.activation, self.extra = encoder, activation, extra


class Strict(pl.LightningModule):
    """A module whose constructor takes only ``width``, as most do."""

    def __init__(self, width: int = 2) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(width, width)


def saved_with(directory: Path, hparams: dict[str, Any], width: int = 2) -> Path:
    """A checkpoint laid out as CheckpointCallback writes one, with ``hparams`` as its hyper-parameters."""
    weights = torch.nn.Linear(width, width).state_dict()
    lightning = {"epoch": 0, "global_step": 1, "hyper_parameters": hparams, "hparams_name": "kwargs"}
    manager = CheckpointManager(directory, max_checkpoints=None)
    return manager.save({f"layer.{name}": tensor for name, tensor in weights.items()}, epoch=0,
                        extra={"lightning": lightning, "layout": {}}).path


# ---------------------------------------------------------------------- Lightning hyper-parameters


@pytest.mark.parametrize(
    "hparams",
    [
        {"_instantiator": ALLOWED_INSTANTIATOR, "encoder": {"class_path": "this.Anything", "init_args": {}}},
        {"_instantiator": ALLOWED_INSTANTIATOR, "activation": "os.system"},
        {"_instantiator": "os.system"},
        {"_instantiator": ALLOWED_INSTANTIATOR, "_class_path": "torch.nn.Linear", "in_features": 10**6},
        {"encoder": {"class_path": "torch.nn.Linear", "init_args": {"in_features": 10**6, "out_features": 10**6}}},
        {"layers": [{"deeper": {"init_args": {"width": 3}}}]},
    ],
    ids=["import-a-module", "callable-by-name", "any-instantiator", "top-level-class", "nested-class", "nested-init-args"],
)
def test_hyper_parameters_that_name_code_are_refused(tmp_path: Path, hparams: dict[str, Any]) -> None:
    assert "this" not in sys.modules
    path = saved_with(tmp_path / "run", hparams)
    with pytest.raises(IncompatibleCheckpointError, match="names code to import or build") as caught:
        load_from_checkpoint(Net, path)
    assert str(path) in str(caught.value) and "instantiate=" in str(caught.value)
    assert "this" not in sys.modules, "a checkpoint made the loader import a module"


def test_allowed_classes_are_built_and_strings_stay_strings(tmp_path: Path) -> None:
    path = saved_with(tmp_path / "run", {
        "_instantiator": ALLOWED_INSTANTIATOR,
        "width": 2,
        "activation": "os.system",
        "encoder": {"class_path": f"{__name__}.Encoder", "init_args": {"width": 3}},
    })
    module = load_from_checkpoint(Net, path, instantiate=[Encoder])
    assert isinstance(module.encoder, Encoder) and module.encoder.width == 3
    assert module.activation == "os.system", "a string is never resolved to a callable"
    assert module.extra == {}

    other = saved_with(tmp_path / "other", {"encoder": {"class_path": "torch.nn.Linear", "init_args": {"in_features": 1}}})
    with pytest.raises(IncompatibleCheckpointError, match="'torch.nn.Linear', which is not in instantiate"):
        load_from_checkpoint(Net, other, instantiate=[Encoder])


def test_a_top_level_class_path_picks_an_allowed_subclass_only(tmp_path: Path) -> None:
    class Wider(Net):
        pass

    path = saved_with(tmp_path / "run", {"_instantiator": ALLOWED_INSTANTIATOR, "_class_path": f"{__name__}.Strict"})
    with pytest.raises(IncompatibleCheckpointError, match="not a subclass of Net"):
        load_from_checkpoint(Net, path, instantiate=[Strict])
    wider = saved_with(tmp_path / "wider", {"_class_path": f"{Wider.__module__}.{Wider.__qualname__}", "width": 2})
    assert type(load_from_checkpoint(Net, wider, instantiate=[Wider])) is Wider


@pytest.mark.parametrize(
    "hparams, width",
    [({"width": "wide"}, 2), ({"width": 3}, 2), ({"width": [1, 2]}, 2)],
    ids=["wrong-type", "weights-do-not-fit", "unhashable"],
)
def test_a_module_that_cannot_be_rebuilt_is_a_checkpoint_error(tmp_path: Path, hparams: dict[str, Any], width: int) -> None:
    path = saved_with(tmp_path / "run", hparams, width=width)
    with pytest.raises(IncompatibleCheckpointError, match=f"cannot rebuild Strict from {path}"):
        load_from_checkpoint(Strict, path)


def test_instantiate_takes_classes(tmp_path: Path) -> None:
    path = saved_with(tmp_path / "run", {"width": 2})
    with pytest.raises(CheckpointError, match="instantiate takes the classes"):
        load_from_checkpoint(Net, path, instantiate=True)  # type: ignore[arg-type]
    assert isinstance(load_from_checkpoint(Net, path), Net)


# ---------------------------------------------------------------------- the HF Trainer's resume


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped after step 10 whose ``checkpoint-10`` links to the manager's checkpoint."""
    from test_hf import make_trainer

    output = tmp_path_factory.mktemp("hf") / "out"
    make_trainer(output, stop_at=10)[0].train()
    assert (output / "checkpoint-10").is_symlink()
    return output


def planted_copy(hf_run: Path, tmp_path: Path, names: tuple[str, ...]) -> Path:
    import shutil

    output = tmp_path / "out"
    shutil.copytree(hf_run, output, symlinks=True)
    for name in names:
        ((output / "checkpoint-10").resolve() / name).write_bytes(NOT_A_PICKLE)
    return output


@pytest.mark.parametrize(
    "names",
    [("rng_state.pth",), ("optimizer.pt", "scheduler.pt"), ("scaler.pt",), ("training_args.bin",), ("pytorch_model.bin",)],
    ids=["rng", "optimizer", "scaler", "training-args", "weights"],
)
def test_resume_never_hands_a_planted_file_to_torch_load(hf_run: Path, tmp_path: Path, names: tuple[str, ...]) -> None:
    from test_hf import make_trainer

    output = planted_copy(hf_run, tmp_path, names)
    with pytest.raises(ForeignFileError, match=names[0].replace(".", r"\.")) as caught:
        trainer, _ = make_trainer(output, seed=1)
        trainer.train(resume_from_checkpoint=True)
    assert "ckpt verify" in str(caught.value)


def test_a_callback_added_after_the_trainer_was_built_refuses_before_the_rng_is_read(hf_run: Path, tmp_path: Path) -> None:
    from test_hf import make_trainer
    from transformers import TrainerCallback

    from ckpt_plugin.hf import CheckpointCallback

    output = planted_copy(hf_run, tmp_path, ("rng_state.pth",))
    trainer, _ = make_trainer(output, seed=1, callback=TrainerCallback())
    trainer.add_callback(CheckpointCallback())
    with pytest.raises(ForeignFileError, match="rng_state"):
        trainer.train(resume_from_checkpoint=True)


def test_a_resume_marker_with_a_planted_file_is_refused(tmp_path: Path) -> None:
    from test_hf import make_trainer

    from ckpt_plugin.hf import EMPTY_SAFETENSORS, REMOTE_MARKER_FILE, TRAINER_STATE_FILE

    marker = tmp_path / "checkpoint-5"
    marker.mkdir()
    (marker / TRAINER_STATE_FILE).write_text("{}")
    (marker / REMOTE_MARKER_FILE).write_text(json.dumps({"checkpoint": "s3://bucket/run/epoch_1@x"}))
    (marker / "model.safetensors").write_bytes(EMPTY_SAFETENSORS)
    (marker / "rng_state.pth").write_bytes(NOT_A_PICKLE)
    with pytest.raises(ForeignFileError, match="rng_state"):
        make_trainer(tmp_path, seed=1)


def test_ckpt_verify_names_the_files_the_format_does_not(hf_run: Path, tmp_path: Path) -> None:
    output = planted_copy(hf_run, tmp_path, ("rng_state.pth", "optimizer.pt"))
    result = CliRunner().invoke(cli.app, ["verify", str(output), "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    named = sorted(Path(problem["path"]).name for problem in report["problems"])
    assert named == ["optimizer.pt", "rng_state.pth"] and not report["ok"]
    assert all("does not name it" in problem["error"] for problem in report["problems"])
