import pytest
import torch

from chatlearn.data.batching import collate, seeded_permutation, shard_sizes, split_batch, split_global_batch


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


def _rows(n):
    return [{"i": torch.tensor(i), "ids": torch.arange(1 + i % 3), "loss_mask": torch.ones(1 + i % 3),
             "chosen_loss_mask": torch.ones(2), "text": f"s{i}"} for i in range(n)]


@pytest.mark.parametrize("dp", [1, 2, 3])
@pytest.mark.parametrize("micro", [1, 2, 3])
def test_split_global_batch_keeps_every_sample_and_pads_with_rows_that_weigh_nothing(dp, micro):
    """Every size from 1 to 3x the micro-batch times the DP size: nothing dropped, equal shapes."""
    for n in range(1, 3 * micro * dp + 2):
        per_rank = split_global_batch(_rows(n), dp, micro)
        assert len(per_rank) == dp
        counts = {len(rank) for rank in per_rank}
        assert len(counts) == 1  # every rank the same number of micro-batches
        shapes = {len(mb["i"]) for rank in per_rank for mb in rank}
        assert len(shapes) == 1 and shapes.pop() <= micro  # every micro-batch the same row count
        real = [int(i) for rank in per_rank for mb in rank for i, v in zip(mb["i"], mb["sample_valid"]) if v == 1]
        assert real == list(range(n))  # each sample once, in order
        for rank in per_rank:
            for mb in rank:
                pad = mb["sample_valid"] == 0
                assert mb["loss_mask"][pad].sum() == 0 and mb["chosen_loss_mask"][pad].sum() == 0
                assert mb["ids"][pad].numel() == 0 or mb["ids"].shape[0] == len(mb["text"])
        padding = sum(int((mb["sample_valid"] == 0).sum()) for rank in per_rank for mb in rank)
        assert padding < dp * len(per_rank[0])  # less than one row per micro-batch


def test_split_global_batch_balances_ranks_and_errors_on_empty():
    per_rank = split_global_batch(_rows(5), 2, 4)
    assert [[int(i) for i, v in zip(mb["i"], mb["sample_valid"]) if v] for rank in per_rank for mb in rank] == \
        [[0, 1, 2], [3, 4]]
    with pytest.raises(ValueError, match="empty"):
        split_global_batch([], 2, 4)
