"""Both framework callbacks with ``local_dir``: checkpoints commit locally, drain to the durable
tier, and a run resumes from the durable tier on a machine whose ``local_dir`` is empty."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import torch

from ckpt_plugin import CheckpointManager
from ckpt_plugin._tiered.journal import JOURNAL_FILE


@pytest.fixture
def durable_url() -> str:
    return f"memory://tiered-{uuid.uuid4().hex[:12]}/run/checkpoints"


def test_lightning_with_local_dir_resumes_from_the_durable_tier_on_a_new_machine(tmp_path: Path, durable_url: str) -> None:
    pytest.importorskip("lightning")
    from test_lightning import RegressionData, fresh_model, make_trainer, run_interrupted

    from ckpt_plugin.lightning import CheckpointCallback

    reference = fresh_model(0)
    make_trainer(tmp_path, 4, [CheckpointCallback(tmp_path / "reference", max_checkpoints=2)]).fit(reference, RegressionData())
    run_interrupted(durable_url, tmp_path, stop_at=2, max_checkpoints=2, local_dir=tmp_path / "first", keep_local=1)
    wait_until_drained(tmp_path / "first")
    torch.manual_seed(1234)
    resumed = fresh_model(99)
    callback = CheckpointCallback(durable_url, max_checkpoints=2, local_dir=tmp_path / "second", keep_local=1)
    make_trainer(tmp_path, 4, [callback]).fit(resumed, RegressionData(), ckpt_path="last")
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    callback.manager.wait()
    assert [info.name for info in CheckpointManager(durable_url).checkpoints()] == ["epoch_2_step_18", "epoch_3_step_24"]
    assert sorted(p.name for p in (tmp_path / "second").iterdir() if not p.name.startswith(".")) == ["epoch_3_step_24"]


def test_hf_with_local_dir_drains_to_the_durable_tier(tmp_path: Path, durable_url: str) -> None:
    pytest.importorskip("transformers")
    from test_hf import make_trainer

    from ckpt_plugin.hf import CheckpointCallback

    trainer, callback = make_trainer(
        tmp_path, callback=CheckpointCallback(durable_url, max_checkpoints=2, local_dir=tmp_path / "local", keep_local=1)
    )
    trainer.train()
    callback.manager.wait()
    assert callback.manager.pending_uploads() == []
    durable = [info.step for info in CheckpointManager(durable_url).checkpoints()]
    assert len(durable) == 2
    [local] = [p.name for p in (tmp_path / "local").iterdir() if not p.name.startswith(".")]
    assert local.endswith(f"_step_{durable[-1]}")


def wait_until_drained(local_dir: Path, timeout: float = 60.0) -> None:
    """Wait until the uploads that an interrupted run left running in this process are durable."""
    deadline = time.monotonic() + timeout
    while (local_dir / JOURNAL_FILE).exists():
        assert time.monotonic() < deadline, "the uploads did not finish"
        time.sleep(0.05)
