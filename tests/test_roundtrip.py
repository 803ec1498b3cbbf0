"""Exact round-trips: every safetensors dtype, odd shapes and layouts, tied weights, optimizer,
scheduler and RNG state, and a resumed run that is bitwise identical to an uninterrupted one."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from ckpt_plugin import CheckpointManager, restore_rng_state

from core_helpers import TinyNet, assert_same_tree, same_bits

SAFETENSORS_DTYPES = [
    getattr(torch, name)
    for name in (
        "float64", "float32", "float16", "bfloat16",
        "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
        "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8",
        "bool", "complex64",
    )
    if hasattr(torch, name)
]


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (NaNs, infinities and -0.0 included for floats)."""
    generator = torch.Generator().manual_seed(seed)
    count = 1
    for dim in shape:
        count *= dim
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator, dtype=torch.uint8).bool()
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (count * size,), generator=generator, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def manager_at(path, **options) -> CheckpointManager:
    options.setdefault("max_checkpoints", None)
    options.setdefault("keep_best", False)
    return CheckpointManager(path, **options)


@pytest.mark.parametrize("dtype", SAFETENSORS_DTYPES, ids=str)
def test_every_safetensors_dtype_round_trips_bit_exactly(tmp_path, dtype):
    base = random_tensor((6, 10), dtype, seed=1)
    state = {
        "matrix": random_tensor((3, 5), dtype, seed=2),
        "scalar": random_tensor((), dtype, seed=3),
        "empty": random_tensor((0, 4), dtype),
        "empty_1d": random_tensor((0,), dtype),
        "transposed": base.t(),
        "strided": base[1:5:2, ::3],
        "offset": base[2:],
    }
    assert not state["transposed"].is_contiguous() and not state["strided"].is_contiguous()
    manager = manager_at(tmp_path)
    manager.save(model=state, epoch=0, metrics={}, extra={"inner": (state["matrix"], [state["scalar"]])})
    loaded = manager.load(epoch=0)
    assert_same_tree(state, loaded["model"])
    assert_same_tree({"inner": (state["matrix"], [state["scalar"]])}, loaded["extra"])

    plain = safetensors.torch.load_file(str(tmp_path / "epoch_0" / "model.safetensors"))
    assert set(plain) == set(state)
    for name, tensor in state.items():
        assert plain[name].dtype == dtype and same_bits(tensor, plain[name]), name


def test_conjugate_and_negative_views_are_stored_resolved(tmp_path):
    complex_base = random_tensor((4,), torch.complex64, seed=5)
    float_base = torch.randn(4)
    state = {"conj": complex_base.conj(), "neg": torch._neg_view(float_base)}
    manager = manager_at(tmp_path)
    manager.save(model=state, epoch=0, metrics={})
    loaded = manager.load(epoch=0)["model"]
    assert torch.equal(loaded["conj"], complex_base.conj().resolve_conj())
    assert torch.equal(loaded["neg"], -float_base)


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.block = nn.Linear(8, 8)
        self.head = nn.Linear(8, 32, bias=False)
        self.head.weight = self.embed.weight


def test_tied_weights_are_stored_once_and_retied(tmp_path):
    torch.manual_seed(0)
    model = TiedLM()
    manager = manager_at(tmp_path)
    manager.save(model=model, epoch=0, metrics={})
    path = tmp_path / "epoch_0" / "model.safetensors"

    plain = safetensors.torch.load_file(str(path))
    stored = {name: tensor for name, tensor in plain.items() if tensor.shape == (32, 8)}
    assert len(stored) == 1, f"the tied weight is stored {len(stored)} times: {sorted(plain)}"
    assert torch.equal(next(iter(stored.values())), model.embed.weight.detach())
    assert path.stat().st_size < 2 * 32 * 8 * 4, "the file is big enough to hold the tied weight twice"

    loaded = manager.load(epoch=0)["model"]
    assert set(loaded) == set(model.state_dict())
    assert loaded["embed.weight"] is loaded["head.weight"] or (
        loaded["embed.weight"].data_ptr() == loaded["head.weight"].data_ptr()
    )
    torch.manual_seed(1)
    fresh = TiedLM()
    result = fresh.load_state_dict(loaded, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    assert_same_tree(model.state_dict(), fresh.state_dict())


def test_shared_tensor_in_different_trees_is_shared_within_each(tmp_path):
    weight = torch.randn(4, 4)
    manager = manager_at(tmp_path)
    manager.save(model={"a": weight, "b": weight, "view": weight[1]}, epoch=0, metrics={},
                 extra={"same": [weight, weight]})
    loaded = manager.load(epoch=0)
    assert torch.equal(loaded["model"]["a"], weight) and torch.equal(loaded["model"]["view"], weight[1])
    assert loaded["model"]["a"] is loaded["model"]["b"]
    assert loaded["extra"]["same"][0] is loaded["extra"]["same"][1]


def make_optimizer(kind: str, params) -> torch.optim.Optimizer:
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.01, "weight_decay": 0.1}]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=True)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=0.01, betas=(0.8, 0.95), amsgrad=True)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=0.01, betas=(0.9, 0.99), weight_decay=0.05)
    raise AssertionError(kind)


def run_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=generator)
        y = torch.randn(8, 2, generator=generator)
        optimizer.zero_grad()
        nn.functional.mse_loss(model.body[0](x) @ torch.ones(8, 2) / 8 + model.body[3].bias, y).backward()
        optimizer.step()


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_optimizer_state_round_trips_exactly_and_training_continues_identically(tmp_path, kind):
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = make_optimizer(kind, list(model.parameters()))
    run_steps(model, optimizer, 3, seed=1)
    state = optimizer.state_dict()
    assert isinstance(next(iter(state["state"])), int)
    manager = manager_at(tmp_path)
    manager.save(model=model, optimizer=optimizer, epoch=3, metrics={"loss": 1.0})

    loaded = manager.load(epoch=3)
    assert_same_tree(state, loaded["optimizer"])
    for group in loaded["optimizer"]["param_groups"]:
        if "betas" in group:
            assert type(group["betas"]) is tuple
        assert all(type(index) is int for index in group["params"])
        assert any(value is None for value in group.values()), "None entries (foreach, fused) must survive"
    assert all(type(key) is int for key in loaded["optimizer"]["state"])

    torch.manual_seed(42)
    fresh_model = TinyNet()
    fresh_model.load_state_dict(loaded["model"])
    fresh_optimizer = make_optimizer(kind, list(fresh_model.parameters()))
    fresh_optimizer.load_state_dict(loaded["optimizer"])
    run_steps(model, optimizer, 3, seed=2)
    run_steps(fresh_model, fresh_optimizer, 3, seed=2)
    assert_same_tree(model.state_dict(), fresh_model.state_dict())
    assert_same_tree(optimizer.state_dict(), fresh_optimizer.state_dict())


def make_scheduler(kind: str, optimizer: torch.optim.Optimizer):
    schedulers = torch.optim.lr_scheduler
    if kind == "step":
        return schedulers.StepLR(optimizer, step_size=2, gamma=0.5)
    if kind == "onecycle":
        return schedulers.OneCycleLR(optimizer, max_lr=0.5, total_steps=20)
    if kind == "cosine_restarts":
        return schedulers.CosineAnnealingWarmRestarts(optimizer, T_0=3, T_mult=2)
    if kind == "plateau":
        return schedulers.ReduceLROnPlateau(optimizer, mode="max", patience=1)
    if kind == "lambda":
        return schedulers.LambdaLR(optimizer, lr_lambda=lambda step: 0.9**step)
    if kind == "sequential":
        warmup = schedulers.LinearLR(optimizer, start_factor=0.1, total_iters=3)
        decay = schedulers.ExponentialLR(optimizer, gamma=0.9)
        return schedulers.SequentialLR(optimizer, [warmup, decay], milestones=[3])
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["step", "onecycle", "cosine_restarts", "plateau", "lambda", "sequential"])
def test_lr_scheduler_state_round_trips(tmp_path, kind):
    def build():
        model = nn.Linear(2, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, optimizer, make_scheduler(kind, optimizer)

    model, optimizer, scheduler = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(5):
            optimizer.step()
            scheduler.step(0.1 * step) if kind == "plateau" else scheduler.step()
    manager = manager_at(tmp_path)
    manager.save(model=model, optimizer=optimizer, scheduler=scheduler, epoch=5, metrics={})
    loaded = manager.load(epoch=5)
    assert_same_tree(scheduler.state_dict(), loaded["scheduler"])

    _, fresh_optimizer, fresh_scheduler = build()
    fresh_optimizer.load_state_dict(loaded["optimizer"])
    fresh_scheduler.load_state_dict(loaded["scheduler"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(4):
            for opt, sched in ((optimizer, scheduler), (fresh_optimizer, fresh_scheduler)):
                opt.step()
                sched.step(1.0) if kind == "plateau" else sched.step()
    assert [g["lr"] for g in fresh_optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]
    assert_same_tree(scheduler.state_dict(), fresh_scheduler.state_dict())


def draw_everything() -> tuple:
    return (torch.rand(5).tolist(), np.random.rand(5).tolist(), [random.random() for _ in range(5)],
            np.random.randn(3).tolist(), random.gauss(0, 1))


def test_rng_states_round_trip(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    draw_everything()
    manager = manager_at(tmp_path)
    manager.save(model={"w": torch.zeros(1)}, epoch=0, metrics={})
    expected = draw_everything()

    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    loaded = manager.load(epoch=0)
    assert {"torch", "numpy", "python"} <= set(loaded["rng"])
    restore_rng_state(loaded["rng"])
    assert draw_everything() == expected


def test_rng_states_are_not_saved_when_disabled(tmp_path):
    manager = manager_at(tmp_path, save_rng=False)
    manager.save(model={"w": torch.zeros(1)}, epoch=0, metrics={})
    assert manager.load(epoch=0).get("rng") is None


def train_epoch(model: nn.Module, optimizer, scheduler) -> None:
    """One epoch that draws from every generator: torch (data, dropout), numpy and random."""
    model.train()
    for _ in range(4):
        x = torch.randn(16, 4) * float(np.random.uniform(0.5, 1.5))
        y = torch.randn(16, 2) + random.random()
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    scheduler.step()


def fresh_run():
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = TinyNet(16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


@pytest.mark.parametrize("how", ["load_latest", "restore"])
def test_a_resumed_run_is_bitwise_identical_to_an_uninterrupted_one(tmp_path, how):
    model, optimizer, scheduler = fresh_run()
    for _ in range(6):
        train_epoch(model, optimizer, scheduler)
    uninterrupted = (model.state_dict(), optimizer.state_dict(), scheduler.state_dict(), draw_everything())

    model, optimizer, scheduler = fresh_run()
    manager = manager_at(tmp_path / "run", max_checkpoints=2)
    for epoch in range(3):
        train_epoch(model, optimizer, scheduler)
        manager.save(model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch, metrics={"loss": 1.0})
    del model, optimizer, scheduler

    # A new process would start from other seeds and fresh objects.
    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    model = TinyNet(16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    resumed_manager = manager_at(tmp_path / "run", max_checkpoints=2)
    if how == "load_latest":
        checkpoint = resumed_manager.load_latest()
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        restore_rng_state(checkpoint["rng"])
        start = checkpoint["epoch"] + 1
    else:
        start = resumed_manager.restore(model, optimizer, scheduler).epoch + 1
    for _ in range(start, 6):
        train_epoch(model, optimizer, scheduler)
    resumed = (model.state_dict(), optimizer.state_dict(), scheduler.state_dict(), draw_everything())
    assert_same_tree(uninterrupted, resumed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_and_rng_state_round_trip(tmp_path):
    torch.manual_seed(5)
    model = nn.Linear(4, 4).cuda()
    torch.rand(3, device="cuda")  # the CUDA generator is in use, so its state is captured
    manager = manager_at(tmp_path)
    manager.save(model=model, epoch=0, metrics={})
    expected = (torch.rand(3, device="cuda").cpu(), torch.rand(3))

    torch.manual_seed(99)
    torch.cuda.manual_seed_all(99)
    loaded = manager.load(epoch=0, map_location="cuda")
    assert all(tensor.device.type == "cuda" for tensor in loaded["model"].values())
    assert_same_tree({k: v.cpu() for k, v in model.state_dict().items()},
                     {k: v.cpu() for k, v in loaded["model"].items()})
    assert "cuda" in loaded["rng"]
    restore_rng_state(loaded["rng"])
    assert_same_tree(expected, (torch.rand(3, device="cuda").cpu(), torch.rand(3)))
