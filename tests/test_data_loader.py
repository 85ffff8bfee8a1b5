"""TokenLoader: windows, ranks, shuffling, exact resume, validation batches."""

import json

import numpy as np
import pytest
import torch

from gpt2lab import UserError
from gpt2lab.data import TokenLoader, open_dataset, write_shard

T = 16
# Unequal shards; the last is too short for a window. Every token is its position in the split,
# so a window's first token says where it came from.
LENGTHS = (1000, 417, 2001, 12)


@pytest.fixture
def folder(tmp_path):
    start = 0
    for index, length in enumerate(LENGTHS):
        write_shard(tmp_path / f"train_{index:06d}.bin", np.arange(start, start + length))
        start += length
    write_shard(tmp_path / "val_000000.bin", np.arange(40000, 40000 + 5 * T + 3))
    return tmp_path


def all_windows(lengths=LENGTHS, seq_len=T) -> set[int]:
    """The first token (= position) of every window of the split."""
    starts, offset = set(), 0
    for length in lengths:
        starts.update(offset + i * seq_len for i in range(max(0, (length - 1) // seq_len)))
        offset += length
    return starts


def window_starts(x: torch.Tensor) -> list[int]:
    return x[:, 0].tolist()


def check_windows(x, y, lengths=LENGTHS):
    """Each row is T+1 consecutive positions of one shard, starting at a multiple of T within it."""
    bounds = np.cumsum((0,) + tuple(lengths))
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        start = row_x[0]
        shard = int(np.searchsorted(bounds, start, side="right")) - 1
        assert (start - bounds[shard]) % T == 0
        assert start + T + 1 <= bounds[shard + 1]
        assert row_x + [row_y[-1]] == list(range(start, start + T + 1))


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_one_epoch_over_ranks_is_disjoint_and_covers_every_window(folder, world_size):
    loaders = [TokenLoader(folder, batch_size=4, seq_len=T, rank=r, world_size=world_size) for r in range(world_size)]
    steps = loaders[0].steps_per_epoch
    assert all(loader.steps_per_epoch == steps for loader in loaders)
    assert loaders[0].windows_per_epoch == steps * 4
    seen = []
    for loader in loaders:
        for _ in range(steps):
            x, y = loader.next_batch()
            assert x.shape == y.shape == (4, T) and x.dtype == y.dtype == torch.int64
            check_windows(x, y)
            seen += window_starts(x)
        assert loader.epoch == 0
    assert len(seen) == len(set(seen)) == steps * 4 * world_size
    assert set(seen) <= all_windows()
    # The windows left over for a whole step still come once each through iter_batches.
    everything = [start for loader in loaders for x, _ in loader.iter_batches() for start in window_starts(x)]
    assert sorted(everything) == sorted(all_windows())


def test_epochs_roll_over_reshuffled(folder):
    loader = TokenLoader(folder, batch_size=8, seq_len=T)
    first = [window_starts(loader.next_batch()[0]) for _ in range(loader.steps_per_epoch)]
    second = [window_starts(loader.next_batch()[0]) for _ in range(loader.steps_per_epoch)]
    assert loader.epoch == 1
    assert first != second
    assert sorted(sum(first, [])) != sum(first, [])  # shuffled, not in file order


def test_same_seed_same_batches_other_seed_other_batches(folder):
    def batches(seed):
        loader = TokenLoader(folder, batch_size=8, seq_len=T, seed=seed)
        return [loader.next_batch()[0] for _ in range(5)]

    assert all(torch.equal(a, b) for a, b in zip(batches(1), batches(1)))
    assert not all(torch.equal(a, b) for a, b in zip(batches(1), batches(2)))


@pytest.mark.parametrize("stop", [0, 3, 8, 19])  # an epoch is 8 batches: 8 ends one, 19 is in the third
def test_resume_from_state_gives_the_same_next_batches(folder, stop):
    original = TokenLoader(folder, batch_size=12, seq_len=T, rank=1, world_size=2, seed=7)
    assert original.steps_per_epoch == 8
    for _ in range(stop):
        original.next_batch()
    state = json.loads(json.dumps(original.state_dict()))
    fresh = TokenLoader(folder, batch_size=12, seq_len=T, rank=1, world_size=2, seed=7)
    fresh.load_state_dict(state)
    assert fresh.epoch == original.epoch
    for _ in range(20):
        (x1, y1), (x2, y2) = original.next_batch(), fresh.next_batch()
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_state_from_another_rank_resumes_this_rank(folder):
    rank0 = TokenLoader(folder, batch_size=4, seq_len=T, rank=0, world_size=2)
    rank1 = TokenLoader(folder, batch_size=4, seq_len=T, rank=1, world_size=2)
    for _ in range(5):
        rank0.next_batch()
        expected = rank1.next_batch()
    fresh1 = TokenLoader(folder, batch_size=4, seq_len=T, rank=1, world_size=2)
    fresh1.load_state_dict(rank0.state_dict())
    assert torch.equal(fresh1.next_batch()[0], rank1.next_batch()[0])
    assert not torch.equal(fresh1.next_batch()[0], expected[0])


@pytest.mark.parametrize(
    "change, message",
    [({"batch_size": 8}, "batch_size 4 \\(now 8\\)"), ({"random_offset": True}, "random_offset"), ({"seed": 5}, "seed")],
)
def test_state_of_a_different_loader_is_refused(folder, change, message):
    state = TokenLoader(folder, batch_size=4, seq_len=T).state_dict()
    other = TokenLoader(folder, **{"batch_size": 4, "seq_len": T, **change})
    with pytest.raises(UserError, match=message):
        other.load_state_dict(state)


def test_state_with_bad_position_is_refused(folder):
    loader = TokenLoader(folder, batch_size=4, seq_len=T)
    with pytest.raises(UserError, match="invalid position"):
        loader.load_state_dict({**loader.state_dict(), "step": 10**6})


def test_validation_batches_are_every_window_in_order(folder):
    val = TokenLoader(folder, split="val", batch_size=2, seq_len=T, shuffle=False)
    batches = list(val.iter_batches())
    assert [x.shape[0] for x, _ in batches] == [2, 2, 1]
    starts = [s for x, _ in batches for s in window_starts(x)]
    assert starts == [40000 + i * T for i in range(5)]
    assert [torch.equal(a[0], b[0]) for a, b in zip(batches, val.iter_batches())] == [True] * 3
    assert len(list(val.iter_batches(max_batches=2))) == 2
    val.reset()
    assert window_starts(val.next_batch()[0]) == [40000, 40000 + T]


def test_split_shorter_than_a_batch_evaluates_but_cannot_train(folder):
    val = TokenLoader(folder, split="val", batch_size=8, seq_len=T, shuffle=False)
    assert val.windows_per_epoch == 0
    assert [x.shape for x, _ in val.iter_batches()] == [(5, T)]
    with pytest.raises(UserError, match="fewer than one step needs"):
        val.next_batch()


def test_split_without_a_window_is_refused(folder):
    with pytest.raises(UserError, match="no shard with 2002 of them"):
        TokenLoader(folder, batch_size=1, seq_len=2001)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 2, "world_size": 2}, "rank must be"),
        ({"batch_size": 0}, "batch_size must be a positive"),
        ({"seq_len": -3}, "seq_len must be a positive"),
        ({"split": "test"}, "no 'test' split"),
    ],
)
def test_bad_settings_are_refused(folder, kwargs, message):
    with pytest.raises(UserError, match=message):
        TokenLoader(folder, **{"batch_size": 4, "seq_len": T, **kwargs})


def test_loads_npy_and_headerless_shards(tmp_path):
    np.save(tmp_path / "edufineweb_train_000000.npy", np.arange(300, dtype=np.uint16))
    np.arange(300, 500, dtype=np.uint16).tofile(tmp_path / "train.bin")
    loader = TokenLoader(tmp_path, batch_size=1, seq_len=T, shuffle=False)
    starts = [s for x, y in loader.iter_batches() for s in window_starts(x)]
    assert starts == [i * T for i in range(18)] + [300 + i * T for i in range(12)]


def test_accepts_an_open_dataset_as_well_as_a_folder(folder):
    dataset = open_dataset(folder)
    from_dataset = TokenLoader(dataset, batch_size=4, seq_len=T)
    from_folder = TokenLoader(str(folder), batch_size=4, seq_len=T)
    assert from_dataset.dataset is dataset
    assert torch.equal(from_dataset.next_batch()[0], from_folder.next_batch()[0])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_batches(folder):
    x, y = TokenLoader(folder, batch_size=4, seq_len=T, pin_memory=True).next_batch()
    assert x.is_pinned() and y.is_pinned()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_pinned_memory_without_cuda_is_refused(folder):
    with pytest.raises(UserError, match="pin_memory=True needs CUDA"):
        TokenLoader(folder, batch_size=4, seq_len=T, pin_memory=True)


def test_random_offsets_shift_each_epoch_and_still_read_disjoint_windows(folder):
    loaders = [TokenLoader(folder, batch_size=4, seq_len=T, rank=r, world_size=2, random_offset=True) for r in range(2)]
    bounds = np.cumsum((0,) + LENGTHS)
    offsets = set()
    for epoch in range(4):
        starts = []
        for loader in loaders:
            for _ in range(loader.steps_per_epoch):
                x, y = loader.next_batch()
                for row_x, row_y in zip(x.tolist(), y.tolist()):
                    start = row_x[0]
                    shard = int(np.searchsorted(bounds, start, side="right")) - 1
                    assert row_x + [row_y[-1]] == list(range(start, start + T + 1))
                    assert start + T + 1 <= bounds[shard + 1]
                    offsets.add((start - bounds[shard]) % T)
                    starts.append(start)
        assert len(starts) == len(set(starts))  # no window read twice in an epoch, across ranks
        assert len({(s - bounds[int(np.searchsorted(bounds, s, side="right")) - 1]) % T for s in starts}) == 1
    assert len(offsets) > 1  # the alignment changes between epochs


def test_random_offsets_resume_exactly_and_are_off_for_evaluation(folder):
    original = TokenLoader(folder, batch_size=4, seq_len=T, random_offset=True, seed=3)
    for _ in range(original.steps_per_epoch + 5):
        original.next_batch()
    fresh = TokenLoader(folder, batch_size=4, seq_len=T, random_offset=True, seed=3)
    fresh.load_state_dict(json.loads(json.dumps(original.state_dict())))
    for _ in range(10):
        assert all(torch.equal(a, b) for a, b in zip(original.next_batch(), fresh.next_batch()))
    plain = TokenLoader(folder, batch_size=4, seq_len=T, seed=3)
    with pytest.raises(UserError, match="random_offset"):
        plain.load_state_dict(original.state_dict())
    ordered = TokenLoader(folder, split="val", batch_size=2, seq_len=T, shuffle=False, random_offset=True)
    assert [x[:, 0].tolist() for x, _ in ordered.iter_batches()] == [[40000, 40016], [40032, 40048], [40064]]


def test_a_position_moves_between_world_sizes(folder):
    """Two ranks after k steps have read the same windows as one rank after 2k steps."""
    pair = [TokenLoader(folder, batch_size=4, seq_len=T, rank=r, world_size=2, random_offset=True) for r in range(2)]
    single = TokenLoader(folder, batch_size=4, seq_len=T, random_offset=True)
    for _ in range(6):
        together = sorted(window_starts(pair[0].next_batch()[0]) + window_starts(pair[1].next_batch()[0]))
        assert together == sorted(window_starts(single.next_batch()[0]) + window_starts(single.next_batch()[0]))
    moved = TokenLoader(folder, batch_size=4, seq_len=T, random_offset=True)
    moved.load_state_dict(pair[1].state_dict())
    assert moved.step == 12 and torch.equal(moved.next_batch()[0], single.next_batch()[0])
    back = [TokenLoader(folder, batch_size=4, seq_len=T, rank=r, world_size=2, random_offset=True) for r in range(2)]
    for loader in back:
        loader.load_state_dict(moved.state_dict() | {"step": 12})
    assert sorted(window_starts(back[0].next_batch()[0]) + window_starts(back[1].next_batch()[0])) == sorted(
        window_starts(pair[0].next_batch()[0]) + window_starts(pair[1].next_batch()[0])
    )
    odd = TokenLoader(folder, batch_size=4, seq_len=T, random_offset=True)
    for _ in range(3):
        odd.next_batch()
    with pytest.raises(UserError, match="not a whole step on 2 ranks"):
        back[0].load_state_dict(odd.state_dict())
