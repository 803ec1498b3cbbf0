"""ckpt_plugin.ResumableDistributedSampler: DistributedSampler's order, with a position that a
checkpoint holds as plain data and that resumes mid-epoch at the same or another world size.

The ranks of a job are played in one process here (each with its own sampler and loader), the
position saved through a CheckpointManager as a training loop would save it; the DDP runs with the
Lightning callback are in tests/test_exactly_once_ddp.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

from ckpt_plugin import CheckpointManager, IncompatibleCheckpointError, ResumableDistributedSampler
from ckpt_plugin import _data_state as data_state

torchdata = pytest.importorskip("torchdata.stateful_dataloader")

SAMPLES, BATCH, SEED, EPOCH = 48, 4, 7, 1


def loader(ranks: int, rank: int, **options) -> torchdata.StatefulDataLoader:  # type: ignore[no-untyped-def]
    sampler = ResumableDistributedSampler(range(SAMPLES), num_replicas=ranks, rank=rank, seed=SEED, **options)
    sampler.set_epoch(EPOCH)
    return torchdata.StatefulDataLoader(range(SAMPLES), batch_size=BATCH, sampler=sampler)


@pytest.mark.parametrize("ranks", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_it_draws_distributed_samplers_order(ranks: int, drop_last: bool) -> None:
    for rank in range(ranks):
        for epoch in (0, 4):
            plain = DistributedSampler(range(SAMPLES - 1), num_replicas=ranks, rank=rank, seed=SEED, drop_last=drop_last)
            ours = ResumableDistributedSampler(range(SAMPLES - 1), num_replicas=ranks, rank=rank, seed=SEED, drop_last=drop_last)
            plain.set_epoch(epoch)
            ours.set_epoch(epoch)
            assert list(ours) == list(plain) and len(ours) == len(plain)


def test_without_a_process_group_it_is_the_only_rank() -> None:
    sampler = ResumableDistributedSampler(range(SAMPLES))
    assert (sampler.num_replicas, sampler.rank) == (1, 0)
    assert sorted(sampler) == list(range(SAMPLES))


def train(ranks: int, batches: int, tmp_path: Path) -> tuple[list[int], CheckpointManager]:
    """Each of ``ranks`` ranks trains ``batches`` batches; rank 0 saves its loader's position."""
    loaders = [loader(ranks, rank) for rank in range(ranks)]
    iterators = [iter(each) for each in loaders]
    trained = [sample for iterator in iterators for _ in range(batches) for sample in next(iterator).tolist()]
    manager = CheckpointManager(tmp_path, max_checkpoints=None)
    saved = data_state.capture(loaders[0], world_size=ranks)
    manager.save({"w": torch.zeros(1)}, epoch=EPOCH, extra={data_state.DATA_STATE_KEY: saved})
    return trained, manager


def resume(ranks: int, manager: CheckpointManager) -> list[list[int]]:
    """The rest of the epoch on each of ``ranks`` ranks, from the position the manager holds."""
    info = manager.latest()
    saved = manager.read(info, items=("extra",))["extra"][data_state.DATA_STATE_KEY]
    rest = []
    for rank in range(ranks):
        each = loader(ranks, rank)
        data_state.restore(each, saved, world_size=ranks, path=info.path)
        iterator = iter(each)  # takes the position back
        left = each.sampler.samples_left()
        rest.append([sample for batch in iterator for sample in batch.tolist()])
        assert len(rest[-1]) == left
    return rest


@pytest.mark.parametrize(("before", "after", "batches"), [(2, 1, 3), (1, 2, 5), (2, 2, 4), (2, 3, 3), (3, 2, 1)])
def test_the_rest_of_an_epoch_is_split_over_the_new_ranks_each_sample_once(
    tmp_path: Path, before: int, after: int, batches: int
) -> None:
    trained, manager = train(before, batches, tmp_path)
    rest = resume(after, manager)
    assert sorted(trained + [sample for ids in rest for sample in ids]) == list(range(SAMPLES))
    assert len({len(ids) for ids in rest}) == 1  # every rank has as many batches left: DDP stays in step


def test_at_the_same_world_size_each_rank_continues_its_own_order(tmp_path: Path) -> None:
    full = [[sample for batch in loader(2, rank) for sample in batch.tolist()] for rank in range(2)]
    trained, manager = train(2, 4, tmp_path)
    rest = resume(2, manager)
    # each rank's loader restores rank 0's position: the ranks are in step
    assert [trained[:16] + rest[0], trained[16:] + rest[1]] == full


def test_the_position_is_plain_data_and_holds_only_for_its_epoch() -> None:
    first = loader(2, 0)
    iterator = iter(first)
    next(iterator)
    state = first.sampler.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert state["yielded"] == BATCH and state["layout"] == {"num_replicas": 2, "start": 0}

    moved_on = ResumableDistributedSampler(range(SAMPLES), num_replicas=1, rank=0, seed=SEED)
    moved_on.load_state_dict(state)
    moved_on.set_epoch(EPOCH + 1)  # a new epoch begins whole
    assert sorted(moved_on) == list(range(SAMPLES))


def test_a_position_saved_at_the_end_of_its_epoch_carries_nothing_over() -> None:
    done = loader(2, 0)
    list(done)
    fresh = ResumableDistributedSampler(range(SAMPLES), num_replicas=1, rank=0, seed=SEED)
    fresh.set_epoch(EPOCH + 1)
    fresh.load_state_dict(done.sampler.state_dict())
    assert fresh.epoch == EPOCH + 1 and sorted(fresh) == list(range(SAMPLES))


def test_a_position_of_another_order_is_refused_naming_what_differs() -> None:
    state = loader(2, 0).sampler.state_dict()
    other = ResumableDistributedSampler(range(SAMPLES), num_replicas=1, rank=0, seed=SEED + 1)
    with pytest.raises(IncompatibleCheckpointError, match=r"seed 7 \(this sampler: 8\)"):
        other.load_state_dict(state)
    with pytest.raises(IncompatibleCheckpointError, match="not a ResumableDistributedSampler state"):
        other.load_state_dict({"yielded": 3})


def test_only_a_resumable_sampler_lets_a_position_resume_at_another_world_size() -> None:
    saved = data_state.capture(loader(2, 0), world_size=2)
    assert saved["any_world_size"] is True
    data_state.check_world_size(saved, 1, "ckpt")

    plain = torchdata.StatefulDataLoader(range(SAMPLES), batch_size=BATCH, shuffle=True)
    refused = data_state.capture(plain, world_size=2)
    assert refused["any_world_size"] is False
    with pytest.raises(IncompatibleCheckpointError, match=r"resume with 2.*end of an epoch.*ResumableDistributedSampler"):
        data_state.check_world_size(refused, 1, "ckpt")
