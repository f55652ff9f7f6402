import pytest
import torch

from chatlearn.data.batching import collate, seeded_permutation, shard_sizes, split_batch


def test_collate_stacks_equal_shapes_and_keeps_lists():
    samples = [{"x": torch.tensor([1, 2]), "s": "a", "r": torch.tensor(0.5)},
               {"x": torch.tensor([3, 4]), "s": "b", "r": torch.tensor(1.5)}]
    batch = collate(samples)
    assert torch.equal(batch["x"], torch.tensor([[1, 2], [3, 4]]))
    assert batch["s"] == ["a", "b"]
    assert torch.equal(batch["r"], torch.tensor([0.5, 1.5]))


def test_collate_right_pads_1d_with_default_and_per_key_values():
    samples = [{"ids": torch.tensor([1, 2, 3]), "mask": torch.tensor([1, 1, 1])},
               {"ids": torch.tensor([4]), "mask": torch.tensor([1])}]
    batch = collate(samples, pad_values={"ids": -100})
    assert torch.equal(batch["ids"], torch.tensor([[1, 2, 3], [4, -100, -100]]))
    assert torch.equal(batch["mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert batch["ids"].dtype == torch.int64


def test_collate_rejects_mismatched_keys_and_2d_ragged():
    with pytest.raises(ValueError, match="keys"):
        collate([{"a": 1}, {"b": 1}])
    with pytest.raises(ValueError, match="shapes"):
        collate([{"a": torch.zeros(2, 2)}, {"a": torch.zeros(3, 2)}])


def test_split_batch_round_trip():
    batch = {"x": torch.arange(6).view(3, 2), "s": ["a", "b", "c"]}
    samples = split_batch(batch)
    assert len(samples) == 3 and samples[1]["s"] == "b"
    assert torch.equal(samples[2]["x"], torch.tensor([4, 5]))
    again = collate(samples)
    assert torch.equal(again["x"], batch["x"]) and again["s"] == batch["s"]
    with pytest.raises(ValueError, match="batch size"):
        split_batch({"x": [1, 2], "y": [1]})


def test_shard_sizes_and_permutation():
    assert shard_sizes(5, 2) == [3, 2]
    assert shard_sizes(1, 3) == [1, 0, 0]
    perm = seeded_permutation(50, 1, 2)
    assert sorted(perm) == list(range(50)) and perm == seeded_permutation(50, 1, 2)
    assert perm != seeded_permutation(50, 2, 1)
