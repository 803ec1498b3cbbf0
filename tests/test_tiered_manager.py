"""``CheckpointManager(durable, local_dir=...)``: saves return once committed locally, uploads drain
in the background, loads read the fastest copy that verifies, retention spans both tiers. The
durable tier is the moto S3 server and ``memory://`` (and a directory); the fast tier a local
directory or /dev/shm."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import threading
import uuid
import warnings
from pathlib import Path

import pytest
import torch

from ckpt_plugin import ArtifactRegistry, CheckpointManager, ConfigurationError, UploadError
from ckpt_plugin.storage import faults

from core_helpers import assert_same_tree


def model_state(version: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((32, 32), float(version)), "b": torch.arange(5, dtype=torch.float64) + version}


@pytest.fixture
def durable_url(remote_url: str) -> str:
    """The durable tier: a fresh URL on the moto S3 server and on ``memory://``."""
    return remote_url


def names(infos: list) -> list[str]:
    return [info.name for info in infos]


class Gate:
    """Holds every upload at its first write until :meth:`open` (a hook of a FaultyBackend)."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.reached = threading.Event()

    def __call__(self, operation: str, key: str) -> None:
        if operation == "write":
            self.reached.set()
            assert self.opened.wait(30), "the gate was never opened"

    def open(self) -> None:
        self.opened.set()


def gated(manager: CheckpointManager) -> Gate:
    gate = Gate()
    manager.route_storage(lambda inner: faults.FaultyBackend(inner, hook=gate))
    return gate


def save(manager: CheckpointManager, epoch: int, loss: float | None = None):
    return manager.save(model_state(epoch), epoch=epoch, metrics={"loss": 1.0 / (epoch + 1) if loss is None else loss})


def test_save_returns_once_committed_locally_and_wait_makes_it_durable(tmp_path: Path, durable_url: str) -> None:
    manager = CheckpointManager(durable_url, local_dir=tmp_path / "local", save_rng=False)
    gate = gated(manager)
    info = save(manager, 0)
    assert Path(info.location).parent == tmp_path / "local"
    assert names(manager.pending_uploads()) == ["epoch_0"]
    assert names(CheckpointManager(durable_url).checkpoints()) == []
    gate.open()
    manager.wait()
    assert manager.pending_uploads() == []
    assert names(CheckpointManager(durable_url).checkpoints()) == ["epoch_0"]
    assert_same_tree(model_state(0), manager.load_latest()["model"])


@pytest.mark.slow  # the default retries take about 8 s to give up
def test_a_persistent_upload_failure_is_raised_by_wait_and_by_the_next_save(tmp_path: Path, durable_url: str) -> None:
    manager = CheckpointManager(durable_url, local_dir=tmp_path / "local", save_rng=False)
    faulty = manager.route_storage(lambda inner: faults.FaultyBackend(inner, fail_after_bytes=0))
    save(manager, 0)
    with pytest.raises(UploadError, match="epoch_0") as raised:
        manager.wait()
    assert "no space left" in str(raised.value.__cause__)
    save(manager, 1)  # the uploads are tried again meanwhile
    with pytest.raises(UploadError, match="epoch_0"):  # two pending: this save waits, and the failure ends the wait
        save(manager, 2)
    assert names(manager.pending_uploads()) == ["epoch_0", "epoch_1"]
    faulty.budget = None  # the store is back
    manager.wait()
    assert manager.pending_uploads() == []
    assert names(CheckpointManager(durable_url).checkpoints()) == ["epoch_0", "epoch_1"]


def test_backpressure_a_save_waits_for_the_oldest_upload(tmp_path: Path, durable_url: str) -> None:
    manager = CheckpointManager(durable_url, local_dir=tmp_path / "local", save_rng=False, max_pending_uploads=1)
    gate = gated(manager)
    save(manager, 0)
    finished = threading.Event()
    worker = threading.Thread(target=lambda: (save(manager, 1), finished.set()), daemon=True)
    worker.start()
    assert not finished.wait(0.5)  # one upload pending: the second save waits
    gate.open()
    assert finished.wait(30)
    manager.wait()
    assert names(CheckpointManager(durable_url).checkpoints()) == ["epoch_0", "epoch_1"]


def test_async_save_combines_with_the_tiers(tmp_path: Path, durable_url: str) -> None:
    with CheckpointManager(durable_url, local_dir=tmp_path / "local", async_save=True, save_rng=False) as manager:
        for epoch in range(3):
            save(manager, epoch)
        manager.wait()
        assert names(manager.checkpoints()) == ["epoch_0", "epoch_1", "epoch_2"]
    assert names(CheckpointManager(durable_url).checkpoints()) == ["epoch_0", "epoch_1", "epoch_2"]


def test_retention_spans_the_tiers_and_never_deletes_the_only_copy(tmp_path: Path, durable_url: str) -> None:
    manager = CheckpointManager(durable_url, local_dir=tmp_path / "local", max_checkpoints=2, keep_local=1,
                                max_pending_uploads=10, save_rng=False)
    faulty = manager.route_storage(lambda inner: faults.FaultyBackend(inner, fail_after_bytes=0))  # an outage, retried
    for epoch in range(4):
        save(manager, epoch)
    assert local_names(tmp_path / "local") == ["epoch_0", "epoch_1", "epoch_2", "epoch_3"]  # each the only copy
    assert names(manager.pending_uploads()) == local_names(tmp_path / "local")
    faulty.budget = None  # the store is back before the retries are spent
    manager.wait()
    assert names(CheckpointManager(durable_url).checkpoints()) == ["epoch_2", "epoch_3"]
    assert local_names(tmp_path / "local") == ["epoch_3"]


def local_names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if not path.name.startswith("."))


def test_a_corrupt_local_copy_falls_back_to_the_durable_one(tmp_path: Path, durable_url: str) -> None:
    manager = CheckpointManager(durable_url, local_dir=tmp_path / "local", save_rng=False)
    info = save(manager, 3)
    manager.wait()
    damaged = Path(info.file("model.safetensors"))
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="durable copy"):
        loaded = manager.load_latest()
    assert_same_tree(model_state(3), loaded["model"])
    model = torch.nn.Linear(32, 32)  # restore reads the durable copy too, changing nothing before it
    state = {"weight": torch.zeros(32, 32), "bias": torch.zeros(32)}
    model.load_state_dict(state)
    manager.close()  # one live manager per local_dir
    fresh = CheckpointManager(durable_url, local_dir=tmp_path / "local", save_rng=False)
    fresh.save({"weight": torch.ones(32, 32), "bias": torch.ones(32)}, epoch=4)
    fresh.wait()
    damaged = Path(fresh.latest().file("model.safetensors"))
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="durable copy"):
        fresh.restore(model, which="latest", restore_rng=False)
    assert torch.equal(model.weight, torch.ones(32, 32))


def test_a_new_machine_with_an_empty_local_dir_restores_from_the_durable_tier(tmp_path: Path, durable_url: str) -> None:
    first = CheckpointManager(durable_url, local_dir=tmp_path / "first", save_rng=False)
    save(first, 0)
    save(first, 1)
    first.wait()
    second = CheckpointManager(durable_url, local_dir=tmp_path / "second", save_rng=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same_tree(model_state(1), second.load_latest()["model"])
        assert_same_tree(model_state(0), second.load(epoch=0)["model"])


def test_local_dir_on_dev_shm(durable_url: str) -> None:
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm here")
    local_dir = Path("/dev/shm") / f"ckpt-tiered-{uuid.uuid4().hex[:12]}"
    try:
        manager = CheckpointManager(durable_url, local_dir=local_dir, keep_local=1, save_rng=False)
        for epoch in range(3):
            save(manager, epoch)
        manager.wait()
        assert names(CheckpointManager(durable_url).checkpoints()) == ["epoch_0", "epoch_1", "epoch_2"]
        assert local_names(local_dir) == ["epoch_2"]
        assert_same_tree(model_state(2), manager.load_latest()["model"])
    finally:
        shutil.rmtree(local_dir, ignore_errors=True)


def test_the_registry_promotes_from_the_durable_tier_while_uploads_are_pending(tmp_path: Path) -> None:
    durable = tmp_path / "run" / "checkpoints"  # a directory as the durable tier (an NFS mount, say)
    manager = CheckpointManager(durable, local_dir=tmp_path / "local", save_rng=False, max_checkpoints=None)
    save(manager, 0, loss=0.2)
    manager.wait()
    gate = gated(manager)
    save(manager, 1, loss=0.1)  # better, but not durable yet
    assert gate.reached.wait(30)
    registry = ArtifactRegistry(durable)
    record = registry.validate("latest", bump="major")
    assert record["source"]["epoch"] == 0  # the durable tier's latest: epoch_1 is still uploading
    registry.promote(record["version"])
    served = registry.load_production()
    assert served is not None and served["epoch"] == 0
    assert_same_tree(model_state(0), served["model"])
    gate.open()
    manager.wait()
    assert names(CheckpointManager(durable).checkpoints()) == ["epoch_0", "epoch_1"]


def test_tier_options_are_checked(tmp_path: Path, durable_url: str) -> None:
    with pytest.raises(ConfigurationError, match="keep_local"):
        CheckpointManager(durable_url, local_dir=tmp_path / "local", keep_local=-1)
    with pytest.raises(ConfigurationError, match="max_pending_uploads"):
        CheckpointManager(durable_url, local_dir=tmp_path / "local", max_pending_uploads=0)
    with pytest.raises(ConfigurationError, match="local_dir"):
        CheckpointManager(durable_url, local_dir="memory://elsewhere/run")


def test_signatures_are_checked_on_whichever_copy_is_read(tmp_path: Path, durable_url: str) -> None:
    pytest.importorskip("model_signing")
    from security_helpers import key_pair

    private, public = key_pair(tmp_path, "ours")
    manager = CheckpointManager(durable_url, local_dir=tmp_path / "local", signing_key=private, save_rng=False)
    info = save(manager, 1)
    manager.wait()
    assert_same_tree(model_state(1), manager.load_latest(verify_with=public)["model"])
    fresh = CheckpointManager(durable_url, local_dir=tmp_path / "empty", save_rng=False)  # the durable copy, signed again
    assert_same_tree(model_state(1), fresh.load_latest(verify_with=public)["model"])
    damaged = Path(info.file("model.safetensors"))
    data = bytearray(damaged.read_bytes())
    data[0] ^= 0x01
    damaged.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="durable copy"):
        assert_same_tree(model_state(1), manager.load_latest(verify_with=public)["model"])


def test_ckpt_list_shows_where_each_checkpoint_has_copies_and_which_are_pending(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ckpt_plugin import cli

    durable = tmp_path / "run" / "checkpoints"
    manager = CheckpointManager(durable, local_dir=tmp_path / "local", keep_local=1, save_rng=False, max_checkpoints=None)
    save(manager, 0)
    save(manager, 1)
    manager.wait()  # epoch_0 is durable only now (keep_local=1), epoch_1 in both tiers
    gate = gated(manager)
    save(manager, 2)  # held: local only, pending
    assert gate.reached.wait(30)
    runner = CliRunner()
    listed = runner.invoke(cli.app, ["list", str(durable), "--local-dir", str(tmp_path / "local"), "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {row["name"]: (row["copies"], row["pending"]) for row in json.loads(listed.output)["checkpoints"]}
    assert rows == {"epoch_0": (["durable"], False), "epoch_1": (["durable", "local"], False), "epoch_2": (["local"], True)}
    table = runner.invoke(cli.app, ["list", str(durable), "--local-dir", str(tmp_path / "local")])
    assert "local (upload pending)" in table.output and "durable+local" in table.output
    assert "copies" not in runner.invoke(cli.app, ["list", str(durable)]).output  # a run in one place: no column
    gate.open()
    manager.wait()


def test_one_live_manager_per_local_dir_in_this_process(tmp_path: Path) -> None:
    first = CheckpointManager(tmp_path / "durable", local_dir=tmp_path / "local", save_rng=False)
    with pytest.raises(ConfigurationError, match="in use by another live CheckpointManager.*close"):
        CheckpointManager(tmp_path / "durable", local_dir=tmp_path / "local", save_rng=False)
    other = CheckpointManager(tmp_path / "durable", local_dir=tmp_path / "other", save_rng=False)  # its own local_dir
    first.close()  # gives local_dir up
    second = CheckpointManager(tmp_path / "durable", local_dir=tmp_path / "local", save_rng=False)
    with pytest.raises(ConfigurationError, match="in use"):
        save(first, 0)  # a closed manager takes local_dir back on its next save, unless another holds it
    save(second, 0)
    second.wait()
    second.close()
    other.close()
    save(first, 1)
    first.wait()
    assert names(first.checkpoints()) == ["epoch_0", "epoch_1"]
    first.close()


def _holder(tmp_path: Path) -> subprocess.Popen[str]:
    """Another process holding a manager on ``tmp_path / "local"``, once it printed ``ready``."""
    script = (
        "import sys; from ckpt_plugin import CheckpointManager; "
        f"manager = CheckpointManager({str(tmp_path / 'durable')!r}, local_dir={str(tmp_path / 'local')!r}); "
        "print('ready', flush=True); sys.stdin.read()"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    ready, _, _ = select.select([process.stdout], [], [], 120)
    assert ready and process.stdout.readline().strip() == "ready", "the holder did not start"
    return process


def test_a_manager_in_another_process_holds_local_dir_until_it_is_killed(tmp_path: Path) -> None:
    holder = _holder(tmp_path)
    try:
        with pytest.raises(ConfigurationError, match="in use by another live CheckpointManager"):
            CheckpointManager(tmp_path / "durable", local_dir=tmp_path / "local", save_rng=False)
    finally:
        holder.kill()  # SIGKILL: the OS releases its lock
        holder.wait(timeout=30)
    manager = CheckpointManager(tmp_path / "durable", local_dir=tmp_path / "local", save_rng=False)
    save(manager, 0)
    manager.wait()
    manager.close()
