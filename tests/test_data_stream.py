import pytest
import torch

from chatlearn.data.batching import seeded_permutation
from chatlearn.data.stream_dataset import StreamDataset


def samples(n, start=0):
    return [{"idx": start + i, "ids": torch.arange(1 + (start + i) % 3)} for i in range(n)]


def idx(batch):
    return [s["idx"] for s in batch]


def test_fixed_epoch0_order_in_global_batches():
    ds = StreamDataset("fixed", 8, train_global_batch_size=4, seed=1)
    ds.set_samples(0, samples(8))
    steps = list(ds.iter_train_batches())
    assert [(e, s, idx(b)) for e, s, b in steps] == [(0, 0, [0, 1, 2, 3]), (0, 1, [4, 5, 6, 7])]
    assert list(ds.iter_train_batches()) == []  # every step is handed out once


def test_later_epochs_reshuffle_each_sample_once():
    ds = StreamDataset("fixed", 8, 4, num_training_epoch=3, seed=11)
    ds.set_samples(5, samples(8))
    steps = list(ds.iter_train_batches())
    assert [(e, s) for e, s, _ in steps] == [(e, s) for e in range(3) for s in range(2)]
    by_epoch = {e: [] for e in range(3)}
    for e, _, batch in steps:
        assert len(batch) == 4
        by_epoch[e] += idx(batch)
    assert by_epoch[0] == list(range(8))
    for e in (1, 2):
        assert by_epoch[e] == seeded_permutation(8, 11, 5, e)
    assert by_epoch[1] != by_epoch[2]


def test_fixed_wrong_count_errors():
    ds = StreamDataset("fixed", 8, 4)
    with pytest.raises(ValueError, match="sample_per_episode=8.*got 6"):
        ds.set_samples(0, samples(6))
    with pytest.raises(ValueError, match="sample_per_episode=8.*got 9"):
        ds.set_samples(0, samples(9))
    with pytest.raises(ValueError, match="multiple"):
        StreamDataset("fixed", 6, 4)


def test_dynamic_takes_all_samples_and_shortens_last_batch():
    ds = StreamDataset("dynamic", 4, train_global_batch_size=4)
    ds.set_samples(0, samples(12))  # 3 x sample_per_episode
    assert ds.num_steps_per_epoch() == 3
    assert [idx(b) for _, _, b in ds.iter_train_batches()] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    ds.set_samples(1, samples(11))
    assert [len(b) for _, _, b in ds.iter_train_batches()] == [4, 4, 3]  # nothing dropped
    ds.set_samples(2, samples(1))
    assert [idx(b) for _, _, b in ds.iter_train_batches()] == [[0]]


def test_dynamic_episode_without_samples_has_no_steps():
    """Every online-DPO pair tied: nothing to train on, and no error."""
    ds = StreamDataset("dynamic", 4, 4, num_training_epoch=2)
    ds.set_samples(3, [])
    assert ds.num_steps_per_epoch() == 0 and list(ds.iter_train_batches()) == []
    ds.start_episode(4)
    ds.finish()
    assert list(ds.ready_batches()) == [] and list(ds.iter_train_batches()) == []


def test_streaming_ready_batches_then_rest():
    ds = StreamDataset("fixed", 8, 4, num_training_epoch=1)
    ds.start_episode(0)
    ds.extend(samples(3))
    assert list(ds.ready_batches()) == []
    ds.extend(samples(2, start=3))
    ready = list(ds.ready_batches())
    assert [(e, s, idx(b)) for e, s, b in ready] == [(0, 0, [0, 1, 2, 3])]
    ds.extend(samples(3, start=5))
    assert [idx(b) for _, _, b in ds.ready_batches()] == [[4, 5, 6, 7]]
    with pytest.raises(RuntimeError, match="finish"):
        next(ds.iter_train_batches())
    ds.finish()
    assert list(ds.iter_train_batches()) == []


def test_streaming_dynamic_with_extra_epoch():
    ds = StreamDataset("dynamic", 4, 4, num_training_epoch=2, seed=3)
    ds.start_episode(7)
    ds.extend(samples(6))
    assert [s for _, s, _ in ds.ready_batches()] == [0]
    ds.finish()
    rest = list(ds.iter_train_batches())
    assert [(e, s, len(b)) for e, s, b in rest] == [(0, 1, 2), (1, 0, 4), (1, 1, 2)]
    assert sorted(idx(rest[1][2]) + idx(rest[2][2])) == list(range(6))


def test_extend_rejects_batch_dict():
    ds = StreamDataset("dynamic", 4, 4)
    ds.start_episode(0)
    with pytest.raises(TypeError, match="split_batch"):
        ds.extend({"idx": [1, 2]})
