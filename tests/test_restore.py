"""manager.restore: straight into live tensors, bitwise equal to load_state_dict, damage detected."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from ckpt_plugin import CheckpointManager, CorruptCheckpointError, IncompatibleCheckpointError
from ckpt_plugin._format.tensorformat import parse
from ckpt_plugin._io.restore import _fast_module


class Net(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8, dtype=dtype)
        self.body = nn.Linear(8, 8, dtype=dtype)
        self.norm = nn.BatchNorm1d(8, dtype=dtype)
        self.head = nn.Linear(8, 16, bias=False, dtype=dtype)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.relu(self.body(self.embed(tokens)))))


def trained(seed: int = 0, steps: int = 3) -> tuple[Net, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    for _ in range(steps):
        model(torch.randint(0, 16, (6,))).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return model, optimizer, scheduler


def assert_same_tree(left, right) -> None:
    if isinstance(left, torch.Tensor):
        assert isinstance(right, torch.Tensor)
        assert left.dtype == right.dtype and left.shape == right.shape
        assert torch.equal(
            left.view(torch.uint8) if left.dtype == torch.bool else left,
            right.view(torch.uint8) if right.dtype == torch.bool else right,
        )
    elif isinstance(left, dict):
        assert left.keys() == right.keys()
        for key in left:
            assert_same_tree(left[key], right[key])
    elif isinstance(left, (list, tuple)):
        assert type(left) is type(right) and len(left) == len(right)
        for a, b in zip(left, right, strict=True):
            assert_same_tree(a, b)
    else:
        assert left == right


def reference(manager: CheckpointManager) -> tuple[Net, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """What the plain path gives: a loaded checkpoint handed to load_state_dict."""
    model, optimizer, scheduler = trained(seed=99, steps=0)
    checkpoint = manager.load_latest()
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    return model, optimizer, scheduler


@pytest.fixture
def saved(tmp_path: Path) -> tuple[CheckpointManager, Net, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    model, optimizer, scheduler = trained()
    manager = CheckpointManager(tmp_path / "ckpt", max_checkpoints=None)
    manager.save(model, optimizer, epoch=1, metrics={"loss": 0.5}, scheduler=scheduler)
    return manager, model, optimizer, scheduler


def test_restore_into_fresh_objects_equals_load_state_dict(saved) -> None:
    manager, source, source_optimizer, source_scheduler = saved
    model, optimizer, scheduler = trained(seed=7, steps=0)
    info = manager.restore(model, optimizer, scheduler)
    assert info is not None and info.epoch == 1
    ref_model, ref_optimizer, ref_scheduler = reference(manager)
    assert_same_tree(model.state_dict(), ref_model.state_dict())
    assert_same_tree(optimizer.state_dict(), ref_optimizer.state_dict())
    assert scheduler.state_dict() == ref_scheduler.state_dict()
    assert_same_tree(model.state_dict(), source.state_dict())
    assert_same_tree(optimizer.state_dict(), source_optimizer.state_dict())
    assert model.head.weight is model.embed.weight


def test_restore_writes_into_the_live_tensors(saved) -> None:
    manager, source, source_optimizer, _ = saved
    model, optimizer, _ = trained(seed=3, steps=2)
    assert _fast_module(model)  # BatchNorm's legacy-key override does not force the regular path
    parameters = [p.data_ptr() for p in model.parameters()]
    state = {id(t) for s in optimizer.state.values() for t in s.values()}
    versions = [p._version for p in model.parameters()]
    manager.restore(model, optimizer)
    assert [p.data_ptr() for p in model.parameters()] == parameters
    assert {id(t) for s in optimizer.state.values() for t in s.values()} == state
    assert all(p._version > v for p, v in zip(model.parameters(), versions, strict=True))
    assert_same_tree(model.state_dict(), source.state_dict())
    assert_same_tree(optimizer.state_dict(), source_optimizer.state_dict())


def test_restored_run_continues_like_the_original(saved) -> None:
    manager, source, source_optimizer, source_scheduler = saved
    model, optimizer, scheduler = trained(seed=11, steps=1)
    manager.restore(model, optimizer, scheduler)
    for m, o, s in ((source, source_optimizer, source_scheduler), (model, optimizer, scheduler)):
        torch.manual_seed(5)
        m(torch.randint(0, 16, (6,))).square().mean().backward()
        o.step()
        s.step()
    assert_same_tree(model.state_dict(), source.state_dict())


def test_restore_casts_like_load_state_dict(saved) -> None:
    manager = saved[0]
    model = Net(dtype=torch.float64)
    manager.restore(model)
    expected = Net(dtype=torch.float64)
    expected.load_state_dict(manager.load_latest()["model"])
    assert_same_tree(model.state_dict(), expected.state_dict())


def test_modules_with_load_hooks_take_the_regular_path(saved) -> None:
    manager, source, _, _ = saved
    model = Net()
    calls = []
    model.body.register_load_state_dict_post_hook(lambda module, keys: calls.append(module))
    manager.restore(model)
    assert calls == [model.body]
    assert_same_tree(model.state_dict(), source.state_dict())


def test_key_mismatch_is_refused_before_anything_changes(saved) -> None:
    manager = saved[0]

    class Other(Net):
        def __init__(self) -> None:
            super().__init__()
            self.extra = nn.Linear(2, 2)

    model = Other()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(IncompatibleCheckpointError, match="extra.weight"):
        manager.restore(model)
    assert_same_tree(model.state_dict(), before)
    manager.restore(model, strict=False)
    assert torch.equal(model.body.weight, saved[1].body.weight)
    assert torch.equal(model.extra.weight, before["extra.weight"])


def test_shape_mismatch_is_refused(saved) -> None:
    manager = saved[0]
    model = Net()
    model.body.weight = nn.Parameter(torch.zeros(4, 8))
    with pytest.raises(IncompatibleCheckpointError, match="shape"):
        manager.restore(model, strict=False)


def test_optimizer_groups_must_match(saved) -> None:
    manager = saved[0]
    model = Net()
    optimizer = torch.optim.Adam([model.body.weight])
    before = model.body.weight.clone()
    with pytest.raises(IncompatibleCheckpointError, match="parameter groups"):
        manager.restore(model, optimizer)
    assert torch.equal(model.body.weight, before)


def flip_data_byte(path: Path) -> None:
    """Damage one byte of tensor data (not the header), as bit rot would."""
    data = bytearray(path.read_bytes())
    specs, _ = parse(memoryview(bytes(data)), len(data), str(path))
    spec = max(specs.values(), key=lambda s: s.nbytes)
    data[spec.start + spec.nbytes // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_model_file_is_named_and_reported_as_overwritten(saved) -> None:
    manager, _, _, _ = saved
    info = manager.latest()
    flip_data_byte(info.path / "model.safetensors")
    model, optimizer, scheduler = trained(seed=4, steps=2)
    optimizer_before = {k: v.clone() for s in optimizer.state.values() for k, v in s.items()}
    scheduler_before = scheduler.state_dict()
    with pytest.raises(CorruptCheckpointError, match="model.safetensors") as caught:
        manager.restore(model, optimizer, scheduler)
    assert "partially overwritten" in str(caught.value)
    assert caught.value.partially_restored == ("model",)
    after = {k: v for s in optimizer.state.values() for k, v in s.items()}
    assert all(torch.equal(after[k], optimizer_before[k]) for k in optimizer_before)
    assert scheduler.state_dict() == scheduler_before


def test_damaged_optimizer_file_leaves_a_fresh_optimizer_untouched(saved) -> None:
    manager, source, _, _ = saved
    flip_data_byte(manager.latest().path / "optimizer.safetensors")
    model, optimizer, _ = trained(seed=4, steps=0)
    with pytest.raises(CorruptCheckpointError, match="optimizer.safetensors") as caught:
        manager.restore(model, optimizer)
    assert caught.value.partially_restored == ()
    assert "No live optimizer tensor was changed" in str(caught.value)
    assert not optimizer.state
    assert_same_tree(model.state_dict(), source.state_dict())


def test_atomic_restore_changes_nothing_on_damage(saved) -> None:
    manager = saved[0]
    flip_data_byte(manager.latest().path / "model.safetensors")
    model, optimizer, _ = trained(seed=4, steps=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        manager.restore(model, optimizer, atomic=True)
    assert_same_tree(model.state_dict(), before)


def test_truncated_file_is_found_before_anything_changes(saved) -> None:
    manager = saved[0]
    path = manager.latest().path / "model.safetensors"
    os.truncate(path, path.stat().st_size - 4)
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        manager.restore(model)
    assert_same_tree(model.state_dict(), before)


def test_restore_by_epoch_and_best(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, max_checkpoints=None)
    snapshots = {}
    for epoch, loss in ((1, 0.9), (2, 0.1), (3, 0.5)):
        model, optimizer, _ = trained(seed=epoch)
        manager.save(model, optimizer, epoch=epoch, metrics={"loss": loss})
        snapshots[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
    model = Net()
    assert manager.restore(model, which="best").epoch == 2
    assert_same_tree(model.state_dict(), snapshots[2])
    assert manager.restore(model, which=1).epoch == 1
    assert_same_tree(model.state_dict(), snapshots[1])
    assert CheckpointManager(tmp_path / "empty").restore(Net()) is None


def test_restore_of_an_optimizer_that_never_stepped(tmp_path: Path) -> None:
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    manager = CheckpointManager(tmp_path)
    manager.save(model, optimizer, epoch=0, metrics={"loss": 1.0})
    target = Net()
    fresh = torch.optim.SGD(target.parameters(), lr=0.5)
    manager.restore(target, fresh)
    assert fresh.param_groups[0]["lr"] == 0.1 and fresh.param_groups[0]["momentum"] == 0.9


def test_restore_gpt2_with_tied_embeddings(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64)
    torch.manual_seed(0)
    source = transformers.GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(source.parameters(), lr=1e-2)
    source(torch.randint(0, 128, (2, 8)), labels=torch.randint(0, 128, (2, 8))).loss.backward()
    optimizer.step()
    manager = CheckpointManager(tmp_path)
    manager.save(source, optimizer, epoch=1, metrics={"loss": 1.0})
    torch.manual_seed(1)
    target = transformers.GPT2LMHeadModel(config)
    target_optimizer = torch.optim.AdamW(target.parameters(), lr=1e-3)
    manager.restore(target, target_optimizer)
    assert_same_tree(target.state_dict(), source.state_dict())
    assert_same_tree(target_optimizer.state_dict(), optimizer.state_dict())
    assert target.lm_head.weight.data_ptr() == target.transformer.wte.weight.data_ptr()
