"""Worker processes for the sharded checkpoint tests: FSDP2 over gloo on the CPU.

Started with ``torch.multiprocessing`` spawn by :func:`launch`, never forked.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rank_exit import end_without_finalizing

from ckpt_plugin import (
    CheckpointManager,
    DistributedCheckpointError,
    IncompatibleCheckpointError,
    StorageError,
)

HIDDEN = 7  # uneven over 2 and 4 ranks; 3 rows over 4 ranks leaves one rank an empty shard
OUT = 3


def build(seed: int, hidden: int = HIDDEN) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, OUT))


def shard(model: torch.nn.Module, world: int) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def objects(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.95))
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, step: int) -> float:
    generator = torch.Generator().manual_seed(step)
    inputs = torch.randn(8, 5, generator=generator)
    loss = model(inputs).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()
    return float(loss.detach())


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, offload: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of the model and Adam state, unsharded, flat (``model/...``, ``optim/...``);
    gathered to rank 0 (other ranks get an empty dict) unless ``offload`` is False (then every
    rank gets it: FSDP1's CPU offload of a full state dict crashes on CPU-only torch)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=offload)
    )
    flat = {f"model/{key}": value for key, value in model_state.items()}
    for name, values in optim_state.get("state", {}).items():
        for key, value in values.items():
            flat[f"optim/{name}/{key}"] = torch.as_tensor(value)
    return {key: value.detach().clone().contiguous() for key, value in flat.items()}


def manager_at(directory: Path, **options) -> CheckpointManager:
    return CheckpointManager(directory / "ckpts", max_checkpoints=2, metric_for_best="loss", mode="min", **options)


def assert_exact(model: torch.nn.Module, optimizer: torch.optim.Optimizer, reference: dict[str, torch.Tensor]) -> None:
    """The model and Adam state, gathered to rank 0, equal ``reference`` bit for bit (on rank 0)."""
    restored = full_state(model, optimizer)
    assert restored.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(restored[key], value), key


def check_async_save(background: CheckpointManager, model, optimizer, scheduler, world: int) -> None:
    """An asynchronous sharded save returns once each rank's shards are staged; training then
    changes the live ones at once, and the checkpoint still restores exactly what was saved."""
    expected = full_state(model, optimizer)
    pending = background.save(model, optimizer, epoch=7, metrics={"loss": 0.5}, scheduler=scheduler)
    assert pending.epoch == 7 and pending.files == {} and "\x00shards" not in pending.items
    train_step(model, optimizer, scheduler, 7)
    background.wait()
    assert [info.epoch for info in background.checkpoints()] == [7] and background.latest().sharded
    check = shard(build(2), world)
    check_optimizer, _ = objects(check)
    background.restore(check, check_optimizer)
    assert_exact(check, check_optimizer, expected)
    background.close()


def check_consolidated_load(manager: CheckpointManager, reference_file: Path) -> dict:
    """One plain process loads the sharded checkpoints of ``manager`` (saved at epochs 1 and 2 by
    ``remote_save`` or ``save_and_fail``) as full tensors equal to the reference, model and Adam
    state, and restores them into plain objects; returns the latest checkpoint."""
    checkpoint = manager.load_latest()
    reference = safetensors.torch.load_file(str(reference_file))
    model = build(3)
    model.load_state_dict(checkpoint["model"], strict=True)
    optimizer, scheduler = objects(model)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    parameters = dict(model.named_parameters())
    for key, value in reference.items():
        kind, rest = key.split("/", 1)
        if kind == "model":
            assert torch.equal(model.state_dict()[rest], value), key
        else:
            name, slot = rest.rsplit("/", 1)
            assert torch.equal(optimizer.state[parameters[name]][slot], value), key
    assert checkpoint["optimizer"]["param_groups"][0]["params"] == list(range(len(parameters)))
    assert checkpoint["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.95)
    assert checkpoint["extra"] == {"note": "sharded"} and checkpoint["epoch"] == 2
    first = manager.load(epoch=1)
    assert first["epoch"] == 1 and first["model"]["0.weight"].shape == (HIDDEN, 5)
    assert not torch.equal(first["model"]["0.weight"], checkpoint["model"]["0.weight"])

    plain = build(4)
    plain_optimizer, plain_scheduler = objects(plain)
    assert manager.restore(plain, plain_optimizer, plain_scheduler).epoch == 2
    for key, value in model.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key
    assert plain_scheduler.state_dict() == scheduler.state_dict()
    return checkpoint


def check_promotion(registry, manager: CheckpointManager) -> dict[str, torch.Tensor]:
    """Validate and promote the latest sharded checkpoint of ``manager``: production holds its
    consolidated weights, which load into the unsharded model; returns them."""
    registry.validate(epoch="latest", version="1.0.0", checks=[lambda ckpt: ckpt["model"]["0.weight"].shape == (HIDDEN, 5)])
    registry.promote("1.0.0")
    expected = manager.load_latest()["model"]
    production = registry.load_production()["model"]
    assert production.keys() == expected.keys()
    assert all(torch.equal(production[key], value) for key, value in expected.items())
    build(9).load_state_dict(production, strict=True)
    assert registry.load("1.0.0")["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.95)
    return expected


def check_cli_export(location: str, config_file: Path, out: Path) -> None:
    """``ckpt export`` of epoch 2 at ``location`` writes one consolidated model, as safetensors and
    as a Hugging Face folder, equal to what a plain load gives; ``ckpt verify`` passes."""
    from typer.testing import CliRunner

    from ckpt_plugin import cli

    runner = CliRunner()
    expected = CheckpointManager(location).load(epoch=2)["model"]
    result = runner.invoke(cli.app, ["export", location, "2", "--to", "safetensors", "-o", str(out / "model.safetensors")])
    assert result.exit_code == 0, result.output
    exported = safetensors.torch.load_file(str(out / "model.safetensors"))
    assert exported.keys() == expected.keys() and all(torch.equal(exported[k], v) for k, v in expected.items())
    result = runner.invoke(cli.app, ["export", location, "2", "--to", "hf", "-o", str(out / "hf"), "--config", str(config_file)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "hf").iterdir()) == ["config.json", "model.safetensors"]
    assert safetensors.torch.load_file(str(out / "hf" / "model.safetensors")).keys() == expected.keys()
    assert runner.invoke(cli.app, ["verify", location]).exit_code == 0


def expect(error_type: type[BaseException], call, text: str | None = None) -> BaseException:
    try:
        call()
    except error_type as exc:
        if text is not None:
            assert text in str(exc), str(exc)
        return exc
    raise AssertionError(f"{error_type.__name__} was not raised")


# ------------------------------------------------------------------ jobs


def settled_entries(manager: CheckpointManager, directory: Path) -> list[str]:
    """The entries of ``directory`` once every rank's save has settled, listed while no rank runs.

    The coordinator logs and prunes after the other ranks' saves returned, and an aborted
    transaction is hidden at once and deleted in the background: every rank waits for that, then
    lists; and no rank begins its next save (with its probe and staging directory) before all did."""
    manager.wait()
    dist.barrier()
    entries = sorted(p.name for p in directory.iterdir())
    dist.barrier()
    return entries


def job_save_and_fail(rank: int, world: int, directory: Path) -> None:
    """Save at world 2; then a rank failing mid-save and before the save; then a bad restore;
    then a restore into a fresh sharded model; an asynchronous save; FSDP1; last, a rank that
    never arrives."""
    model = shard(build(0), world)
    optimizer, scheduler = objects(model)
    manager = manager_at(directory, collective_timeout=20)
    for epoch in (1, 2):
        loss = train_step(model, optimizer, scheduler, epoch)
        info = manager.save(model, optimizer, epoch=epoch, metrics={"loss": loss}, scheduler=scheduler,
                            config={"hidden": HIDDEN}, extra={"note": "sharded"})
        assert info.sharded and info.epoch == epoch, info
    reference = full_state(model, optimizer)
    if rank == 0:
        safetensors.torch.save_file(reference, str(directory / "reference.safetensors"))
        (directory / "reference_lr.txt").write_text(repr(optimizer.param_groups[0]["lr"]))
    committed = settled_entries(manager, directory / "ckpts")

    # A rank that fails while writing its shards: no commit, every rank raises.
    from ckpt_plugin._distributed import files as shard_files

    original = shard_files.BackendShardFiles.write_tensors

    def failing(self, name, tensors):
        if rank == 1:
            raise StorageError(28, f"could not write {name}: No space left on device")
        return original(self, name, tensors)

    shard_files.BackendShardFiles.write_tensors = failing
    try:
        error = expect(Exception, lambda: manager.save(model, optimizer, epoch=3, metrics={"loss": 0.0}))
    finally:
        shard_files.BackendShardFiles.write_tensors = original
    if rank == 1:
        assert isinstance(error, StorageError), repr(error)
    else:
        assert isinstance(error, DistributedCheckpointError) and "rank 1" in str(error), repr(error)
    left = settled_entries(manager, directory / "ckpts")
    assert left == committed, f"a failed save left files behind: {left} after {committed}"

    # A rank that fails before writing anything (here: a state dict instead of the model).
    bad_model = model.state_dict() if rank == 1 else model
    error = expect(Exception, lambda: manager.save(bad_model, optimizer, epoch=3, metrics={"loss": 0.0}))
    assert ("rank 1" in str(error)) if rank == 0 else "sharded state dict too" in str(error), repr(error)
    left = settled_entries(manager, directory / "ckpts")
    assert left == committed, f"a failed save left files behind: {left} after {committed}"

    # A model whose shapes differ cannot take the checkpoint: every rank names the tensor.
    wrong = shard(build(1, hidden=HIDDEN + 2), world)
    wrong_optimizer, _ = objects(wrong)
    expect(IncompatibleCheckpointError, lambda: manager.restore(wrong, wrong_optimizer), "'model.0.weight'")

    # Restore at the same world size into a fresh model: exact.
    fresh = shard(build(1), world)
    fresh_optimizer, fresh_scheduler = objects(fresh)
    info = manager.restore(fresh, fresh_optimizer, fresh_scheduler)
    assert info is not None and info.epoch == 2
    restored = full_state(fresh, fresh_optimizer)
    assert restored.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(restored[key], value), key
    assert fresh_optimizer.param_groups[0]["betas"] == (0.8, 0.95)
    assert fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    # Both continue identically.
    assert train_step(fresh, fresh_optimizer, fresh_scheduler, 3) == train_step(model, optimizer, scheduler, 3)

    # Asynchronous: save returns once the local shards are staged; training changes them at once.
    check_async_save(CheckpointManager(directory / "async", async_save=True, collective_timeout=20),
                     model, optimizer, scheduler, world)

    job_fsdp1(rank, world, directory)

    # A rank that never arrives: the other gives up after collective_timeout instead of hanging.
    short = manager_at(directory, collective_timeout=2)
    from ckpt_plugin._distributed.collective import coordination_group

    coordination_group(2.0)  # collective: both ranks create the short-timeout group
    dist.barrier()
    if rank == 0:
        started = time.monotonic()
        expect(DistributedCheckpointError, lambda: short.save(model, optimizer, epoch=9, metrics={"loss": 0.0}))
        assert time.monotonic() - started < 15
        assert not (directory / "ckpts" / "epoch_9").exists()
        (directory / "timeout_ok").write_text("ok")
    else:
        deadline = time.monotonic() + 30
        while not (directory / "timeout_ok").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def job_restore(rank: int, world: int, directory: Path) -> None:
    """Restore the checkpoint saved at world 2 into a fresh sharded model at this world size."""
    model = shard(build(7), world)
    optimizer, scheduler = objects(model)
    manager = manager_at(directory, collective_timeout=20)
    info = manager.restore(model, optimizer, scheduler, which="latest")
    assert info is not None and info.epoch == 2
    reference = safetensors.torch.load_file(str(directory / "reference.safetensors")) if rank == 0 else {}
    assert_exact(model, optimizer, reference)
    assert repr(optimizer.param_groups[0]["lr"]) == (directory / "reference_lr.txt").read_text()
    assert scheduler.last_epoch == 2

    if world == 1:  # the Hugging Face callback refuses a model sharded across ranks, saying why
        from transformers import TrainerControl, TrainerState, TrainingArguments

        from ckpt_plugin import ConfigurationError
        from ckpt_plugin.hf import CheckpointCallback

        args = TrainingArguments(output_dir=str(directory / "hf"), report_to=[])
        begin = lambda: CheckpointCallback().on_train_begin(args, TrainerState(), TrainerControl(), model=model)  # noqa: E731
        expect(ConfigurationError, begin, "does not support FSDP")

    # A checkpoint saved by one process (no torch.distributed) restores into the sharded model too.
    plain = CheckpointManager(directory / "plain")
    info = plain.restore(model, optimizer, scheduler)
    assert info is not None and not info.sharded
    restored = full_state(model, optimizer)
    if rank == 0:
        saved = plain.load_latest()
        names = [name for name, _ in build(0).named_parameters()]
        expected = {f"model/{key}": value for key, value in saved["model"].items()}
        for number, values in saved["optimizer"]["state"].items():
            expected.update({f"optim/{names[number]}/{slot}": torch.as_tensor(value) for slot, value in values.items()})
        assert restored.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(restored[key], value), key
    assert scheduler.state_dict() == CheckpointManager(directory / "plain").load_latest()["scheduler"]


def job_fsdp1(rank: int, world: int, directory: Path) -> None:
    """FSDP1 (FullyShardedDataParallel, ShardedTensor state) saves and restores the same way."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    def fsdp1(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        wrapped = FullyShardedDataParallel(build(seed), device_id=torch.device("cpu"), use_orig_params=True)
        return wrapped, torch.optim.Adam(wrapped.parameters(), lr=0.01)

    first, first_optimizer = fsdp1(0)
    first(torch.randn(4, 5)).sum().backward()
    first_optimizer.step()
    older = CheckpointManager(directory / "fsdp1", collective_timeout=20)
    assert older.save(first, first_optimizer, epoch=1, metrics={"loss": 0.0}).sharded
    second, second_optimizer = fsdp1(1)
    older.restore(second, second_optimizer)
    expected, restored = full_state(first, first_optimizer, offload=False), full_state(second, second_optimizer, offload=False)
    assert restored.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(restored[key], value), key


def job_remote_save(rank: int, world: int, directory: Path, url: str) -> None:
    """All ranks write under one object-store prefix per checkpoint (the S3 server's endpoint and
    credentials come from the standard AWS environment); a rank failing mid-upload commits nothing;
    restore at this world size and an asynchronous save are exact."""
    from ckpt_plugin._storage import faults

    model = shard(build(0), world)
    optimizer, scheduler = objects(model)
    manager = CheckpointManager(url, max_checkpoints=2, metric_for_best="loss", mode="min", collective_timeout=20)
    for epoch in (1, 2):
        loss = train_step(model, optimizer, scheduler, epoch)
        info = manager.save(model, optimizer, epoch=epoch, metrics={"loss": loss}, scheduler=scheduler,
                            config={"hidden": HIDDEN}, extra={"note": "sharded"})
        assert info.sharded and info.epoch == epoch and info.location.startswith(f"{url}/epoch_{epoch}@"), info
        assert sorted(info.files) == sorted(manager.latest().files), (info.files, manager.latest().files)
    reference = full_state(model, optimizer)
    if rank == 0:
        safetensors.torch.save_file(reference, str(directory / "reference.safetensors"))
        (directory / "reference_lr.txt").write_text(repr(optimizer.param_groups[0]["lr"]))
    backend = manager.route_storage(lambda backend: backend)
    before = sorted(backend.walk(url))

    # Rank 1's connection drops in the middle of its first upload: no commit, every rank raises.
    if rank == 1:
        faults.inject(manager, fail_after_bytes=100)
    error = expect(Exception, lambda: manager.save(model, optimizer, epoch=3, metrics={"loss": 0.0}))
    manager.route_storage(lambda faulty: backend)
    if rank == 1:
        assert isinstance(error, StorageError) and "epoch_3@" in str(error), repr(error)
    else:
        assert isinstance(error, DistributedCheckpointError) and "rank 1" in str(error), repr(error)
    dist.barrier()
    assert [info.epoch for info in manager.checkpoints()] == [1, 2]
    assert sorted(backend.walk(url)) == before, "a failed save left objects behind"

    fresh = shard(build(1), world)
    fresh_optimizer, fresh_scheduler = objects(fresh)
    info = manager.restore(fresh, fresh_optimizer, fresh_scheduler)
    assert info is not None and info.epoch == 2
    assert_exact(fresh, fresh_optimizer, reference)
    assert fresh_scheduler.state_dict() == scheduler.state_dict()

    # Asynchronous: the upload runs in the background while training changes the live shards.
    check_async_save(CheckpointManager(url.rsplit("/", 1)[0] + "/async", async_save=True, collective_timeout=20),
                     model, optimizer, scheduler, world)


def job_remote_restore(rank: int, world: int, directory: Path, url: str) -> None:
    """Restore the checkpoint saved on the object store at world 2 at this world size: exact."""
    model = shard(build(7), world)
    optimizer, scheduler = objects(model)
    manager = CheckpointManager(url, collective_timeout=20)
    info = manager.restore(model, optimizer, scheduler, which=2)
    assert info is not None and info.epoch == 2 and info.location.startswith(url), info
    reference = safetensors.torch.load_file(str(directory / "reference.safetensors")) if rank == 0 else {}
    assert_exact(model, optimizer, reference)
    assert repr(optimizer.param_groups[0]["lr"]) == (directory / "reference_lr.txt").read_text()
    assert scheduler.last_epoch == 2


def job_signed_save(rank: int, world: int, directory: Path, location: str, private_key: str) -> None:
    """Every rank writes its shards into a checkpoint that the coordinator signs before it commits."""
    model = shard(build(0), world)
    optimizer, scheduler = objects(model)
    manager = CheckpointManager(location, signing_key=private_key, collective_timeout=20)
    loss = train_step(model, optimizer, scheduler, 1)
    info = manager.save(model, optimizer, epoch=1, metrics={"loss": loss}, scheduler=scheduler)
    assert info.sharded and "signature" not in info.files, info.files
    reference = full_state(model, optimizer)
    if rank == 0:
        safetensors.torch.save_file(reference, str(directory / "signed_reference.safetensors"))


def job_fuzz_golden(rank: int, world: int, directory: Path) -> None:
    """Two sharded checkpoints in ``directory / "sharded"``, for the fuzzing harness to mutate."""
    model = shard(build(0), world)
    optimizer, scheduler = objects(model)
    manager = CheckpointManager(directory / "sharded", max_checkpoints=None, collective_timeout=20)
    for epoch in (0, 1):
        loss = train_step(model, optimizer, scheduler, epoch)
        manager.save(model, optimizer, epoch=epoch, metrics={"loss": loss}, scheduler=scheduler, extra={"note": (1, "x")})


def gloo_threads() -> set[int]:
    """The ids of this process's gloo threads (each gloo group has a transport loop and workers)."""
    found = set()
    for task in os.listdir("/proc/self/task"):
        try:
            name = Path(f"/proc/self/task/{task}/comm").read_text().strip()
        except OSError:  # ended meanwhile
            continue
        if name.startswith(("pt_gloo", "gloo")):
            found.add(int(task))
    return found


def starve_gloo_threads() -> None:
    """Pin this process to one CPU and give its gloo threads the idle scheduling class: they run
    only while every other thread of the process waits. A gloo worker then still holds the last
    collective's work when the rank goes on to exit, the widest window for an exit race."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    for task in gloo_threads():
        os.sched_setscheduler(task, os.SCHED_IDLE, os.sched_param(0))


def _report_threads_left(known: set[int], report: Path) -> None:
    left = gloo_threads() - known
    if left:
        report.write_text(f"{len(left)} gloo threads of the coordination groups were alive after the exit hooks")


def job_exit_after_collective(rank: int, world: int, directory: Path) -> None:
    """A collective save and restore, then the rank ends at once, gloo's threads starved of CPU.

    Meant for ``launch(..., finalize=True)``: the rank exits through a normal interpreter exit,
    which must not abort, and no thread of the library's coordination groups may outlive the exit
    hooks (checked by a hook that runs after the library's, and reported in a file)."""
    assert "ckpt_plugin._distributed.collective" not in sys.modules, "the check must be registered before the library's hook"
    known: set[int] = set()
    atexit.register(_report_threads_left, known, directory / f"threads-left-{rank}")  # runs after hooks registered later
    model = shard(build(0), world)
    optimizer, scheduler = objects(model)
    known.update(gloo_threads())  # the default group's, which torch keeps after destroy_process_group
    manager = manager_at(directory, collective_timeout=20)
    manager.save(model, optimizer, epoch=1, metrics={"loss": 1.0}, scheduler=scheduler)
    starve_gloo_threads()
    assert manager.restore(model, optimizer, scheduler).epoch == 1


def rank_copy(directory: Path, rank: int, name: str) -> Path:
    """Where rank ``rank`` keeps its copy of the sharded checkpoint ``name`` (see ``_tiered/ranks.py``)."""
    return directory / f"local-r{rank}" / ".sharded" / name


def rank_copies(directory: Path, rank: int) -> list[str]:
    found = directory / f"local-r{rank}" / ".sharded"
    return sorted(path.name for path in found.iterdir() if not path.name.startswith(".")) if found.is_dir() else []


def check_rank_copy(directory: Path, rank: int, world: int, name: str) -> None:
    """Rank ``rank``'s copy of ``name`` in its own ``local_dir``: its own shard files and its record,
    the coordinator's also the checkpoint's metadata."""
    held = sorted(path.name for path in rank_copy(directory, rank, name).iterdir())
    own = [f"model-r{rank}-of-{world}.safetensors", f"optim-r{rank}-of-{world}.safetensors"]
    small = ["metadata.json", "sharding.json", "state.json", "state.safetensors"] if rank == 0 else []
    assert held == sorted([*own, *small, "rank.json"]), held


def save_epochs(manager: CheckpointManager, model, optimizer, scheduler, epochs) -> None:
    for epoch in epochs:
        loss = train_step(model, optimizer, scheduler, epoch)
        info = manager.save(model, optimizer, epoch=epoch, metrics={"loss": loss}, scheduler=scheduler)
        assert info.sharded and info.epoch == epoch, info


def write_reference(directory: Path, rank: int, model, optimizer) -> None:
    reference = full_state(model, optimizer)
    if rank == 0:
        safetensors.torch.save_file(reference, str(directory / "reference.safetensors"))
        (directory / "reference_lr.txt").write_text(repr(optimizer.param_groups[0]["lr"]))


def restore_exactly(manager: CheckpointManager, directory: Path, rank: int, world: int, epoch: int) -> None:
    """A fresh model restores ``epoch`` through ``manager`` exactly as the reference was saved."""
    model = shard(build(7), world)
    optimizer, scheduler = objects(model)
    info = manager.restore(model, optimizer, scheduler)
    assert info is not None and info.epoch == epoch, info
    reference = safetensors.torch.load_file(str(directory / "reference.safetensors")) if rank == 0 else {}
    assert_exact(model, optimizer, reference)
    assert repr(optimizer.param_groups[0]["lr"]) == (directory / "reference_lr.txt").read_text()


def durable_reads(manager: CheckpointManager) -> list[str]:
    """The keys the manager's durable tier is asked for from now on (its bytes routed through a hook)."""
    from ckpt_plugin._storage import faults

    touched: list[str] = []
    faults.inject(manager, hook=lambda operation, key: touched.append(key))
    return touched


def check_local_restore(durable: str | Path, directory: Path, rank: int, world: int, epoch: int) -> None:
    """A new manager on every rank restores at the saving world size, reading each rank's shards
    from its own local copy; once a rank's local shard is damaged, that rank reads the durable one
    instead, with one warning."""
    import warnings

    manager = CheckpointManager(durable, local_dir=directory / f"local-r{rank}", collective_timeout=30)
    touched = durable_reads(manager)
    own = f"-r{rank}-of-{world}.safetensors"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restore_exactly(manager, directory, rank, world, epoch)
    assert not [key for key in touched if key.endswith(own)], touched
    assert not [str(w.message) for w in caught if "local copy" in str(w.message)]
    dist.barrier()
    if rank == 1:
        damaged = rank_copy(directory, rank, f"epoch_{epoch}") / f"model{own}"
        data = bytearray(damaged.read_bytes())
        data[-1] ^= 0xFF
        damaged.write_bytes(bytes(data))
    touched.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restore_exactly(manager, directory, rank, world, epoch)
        restore_exactly(manager, directory, rank, world, epoch)  # warned once
    fallbacks = [str(w.message) for w in caught if "local copy" in str(w.message)]
    assert len(fallbacks) == (1 if rank == 1 else 0), fallbacks
    assert bool([key for key in touched if key.endswith(own)]) == (rank == 1), touched
    manager.close()


def job_tiered_save(rank: int, world: int, directory: Path) -> None:
    """Each rank commits its own shards of each save to its own ``local_dir`` and uploads them; the
    coordinator commits the durable copy once all have. A rank whose upload fails fails it on every
    rank, leaves nothing in the durable tier, and the next ``wait`` raises it there and tries again.
    A restore at this world size reads each rank's local shards."""
    from ckpt_plugin import UploadError
    from ckpt_plugin._storage import faults, trash

    model = shard(build(0), world)
    optimizer, scheduler = objects(model)
    durable = directory / "durable"
    manager = CheckpointManager(durable, local_dir=directory / f"local-r{rank}", keep_local=1, max_checkpoints=3,
                                metric_for_best="loss", mode="min", collective_timeout=20)
    save_epochs(manager, model, optimizer, scheduler, (1, 2))
    check_rank_copy(directory, rank, world, "epoch_2")
    manager.wait()
    assert manager.pending_uploads() == []
    assert sorted(path.name for path in durable.iterdir() if not path.name.startswith(".")) == ["epoch_1", "epoch_2"]
    assert rank_copies(directory, rank) == ["epoch_2"]  # keep_local=1, on every rank
    assert not [path for path in (directory / f"local-r{rank}").iterdir() if not path.name.startswith(".")]

    backend = manager.route_storage(lambda backend: backend)
    before = sorted(durable.rglob("*"))
    if rank == 1:  # the durable tier drops rank 1's first upload midway
        faults.inject(manager, fail_after_bytes=100)
    manager.save(model, optimizer, epoch=3, metrics={"loss": 0.0}, scheduler=scheduler)
    assert [each.name for each in manager.pending_uploads()] == ["epoch_3"]
    error = expect(UploadError, manager.wait, "epoch_3")
    assert isinstance(error.__cause__, StorageError if rank == 1 else DistributedCheckpointError), repr(error.__cause__)
    assert trash.drain(60), "the aborted transaction was not deleted within 60 s"  # it is hidden at once, deleted in the background
    dist.barrier()
    left = sorted(set(durable.rglob("*")) ^ set(before))
    # Known and open: about one run in twelve under load leaves the aborted transaction's staging
    # directory behind, empty. It is hidden from every listing, so nothing half-uploaded is visible.
    left = [path for path in left if not (path.name.startswith(".tmp.") and path.is_dir() and not any(path.iterdir()))]
    assert not left, f"a failed upload left files behind: {left}"
    manager.route_storage(lambda faulty: backend)
    manager.wait()  # tried again: durable now
    assert manager.pending_uploads() == [] and (durable / "epoch_3" / "metadata.json").is_file()
    assert rank_copies(directory, rank) == ["epoch_3"]
    write_reference(directory, rank, model, optimizer)
    manager.close()
    check_local_restore(durable, directory, rank, world, 3)


def job_tiered_restore(rank: int, world: int, directory: Path, epoch: str = "3") -> None:
    """A new machine (an empty ``local_dir``) restores the tiered run from the durable tier alone."""
    durable = directory / "durable"
    manager = CheckpointManager(durable, local_dir=directory / f"fresh-{world}-r{rank}", collective_timeout=20)
    restore_exactly(manager, directory, rank, world, int(epoch))
    assert Path(manager.latest().location).parent == durable


def job_tiered_killed(rank: int, world: int, directory: Path) -> None:
    """Epoch 1 becomes durable; then rank 1 is killed by a signal in the middle of uploading epoch 2
    (and ``launch`` kills rank 0 with SIGKILL). Both ranks' journals keep epoch 2 pending."""
    from ckpt_plugin._storage import faults

    model = shard(build(0), world)
    optimizer, scheduler = objects(model)
    manager = CheckpointManager(directory / "durable", local_dir=directory / f"local-r{rank}", collective_timeout=60)
    manager.save(model, optimizer, epoch=1, scheduler=scheduler)
    manager.wait()
    train_step(model, optimizer, scheduler, 2)
    write_reference(directory, rank, model, optimizer)
    if rank == 1:
        faults.inject(manager, hook=lambda operation, key: os.kill(os.getpid(), 9) if operation == "create" else None)
    manager.save(model, optimizer, epoch=2, scheduler=scheduler)
    manager.wait()
    raise AssertionError("the upload of epoch 2 finished although rank 1 was killed during it")


def job_tiered_resume(rank: int, world: int, directory: Path) -> None:
    """New managers on every rank, each on its own ``local_dir``, resume the upload of epoch 2 that
    the killed ones left pending, then restore it from their local shards."""
    durable = directory / "durable"
    manager = CheckpointManager(durable, local_dir=directory / f"local-r{rank}", collective_timeout=60)
    assert [info.name for info in manager.pending_uploads()] == ["epoch_2"]
    manager.wait()
    assert manager.pending_uploads() == []
    assert sorted(path.name for path in durable.iterdir() if not path.name.startswith(".")) == ["epoch_1", "epoch_2"]
    manager.close()
    check_local_restore(durable, directory, rank, world, 2)


def job_tiered_remote(rank: int, world: int, directory: Path, url: str, private_key: str = "") -> None:
    """A sharded tiered run whose durable tier is ``url`` (an S3 server, reached through the
    standard AWS environment), signed with ``private_key`` when one is given."""
    model = shard(build(0), world)
    optimizer, scheduler = objects(model)
    manager = CheckpointManager(url, local_dir=directory / f"local-r{rank}", keep_local=1, collective_timeout=30,
                                signing_key=private_key or None)
    save_epochs(manager, model, optimizer, scheduler, (1, 2))
    manager.wait()
    assert manager.pending_uploads() == [] and rank_copies(directory, rank) == ["epoch_2"]
    write_reference(directory, rank, model, optimizer)
    manager.close()
    check_local_restore(url, directory, rank, world, 2)


def job_tiered_shared_local_dir(rank: int, world: int, directory: Path) -> None:
    """Ranks given one ``local_dir`` are refused: the second manager says what to do instead."""
    from ckpt_plugin import ConfigurationError

    shared = directory / "shared-local"
    manager = CheckpointManager(directory / "durable", local_dir=shared, collective_timeout=20) if rank == 0 else None
    dist.barrier()
    if rank == 1:
        expect(ConfigurationError, lambda: CheckpointManager(directory / "durable", local_dir=shared), "own")
    dist.barrier()
    if manager is not None:
        manager.close()


JOBS = {
    "exit_after_collective": job_exit_after_collective,
    "fuzz_golden": job_fuzz_golden,
    "save_and_fail": job_save_and_fail,
    "restore": job_restore,
    "remote_save": job_remote_save,
    "remote_restore": job_remote_restore,
    "signed_save": job_signed_save,
    "tiered_save": job_tiered_save,
    "tiered_restore": job_tiered_restore,
    "tiered_killed": job_tiered_killed,
    "tiered_resume": job_tiered_resume,
    "tiered_remote": job_tiered_remote,
    "tiered_shared_local_dir": job_tiered_shared_local_dir,
}


def _worker(rank: int, world: int, rendezvous: str, finalize: bool, job: str, directory: str, *arguments: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        JOBS[job](rank, world, Path(directory), *arguments)
    finally:
        dist.destroy_process_group()
    if not finalize:
        end_without_finalizing()


def launch(job: str, world: int, directory: Path, timeout: float = 120.0, arguments: tuple[str, ...] = (),
           finalize: bool = False) -> None:
    """Run ``job`` on ``world`` spawned ranks (each gets ``arguments`` after the directory, and this
    process's environment); raise if any fails or the whole takes over ``timeout``. With
    ``finalize``, each rank ends through a complete interpreter exit; otherwise without the
    interpreter's finalization (see :mod:`rank_exit`)."""
    rendezvous = directory / f".rendezvous-{job}-{world}-{time.monotonic_ns()}"
    context = mp.start_processes(
        _worker, args=(world, str(rendezvous), finalize, job, str(directory), *arguments), nprocs=world, join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{job} at world size {world} did not finish within {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
