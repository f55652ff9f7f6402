"""The epochs of examples/megatron/standalone.py's ``fit`` (SFT and reward-model training)."""
import pytest
from standalone import epoch_batches  # examples/megatron (tests/conftest.py)


@pytest.mark.parametrize("num_samples,size", [(10, 4), (7, 7), (1, 1), (9, 2)])
def test_an_epoch_visits_every_sample_once_with_a_short_last_batch(num_samples, size):
    batches = epoch_batches(num_samples, size, seed=3, drop_last=False)
    assert sorted(i for b in batches for i in b) == list(range(num_samples))
    assert [len(b) for b in batches[:-1]] == [size] * (len(batches) - 1)
    assert len(batches[-1]) == (num_samples % size or size)


@pytest.mark.parametrize("num_samples,size", [(10, 4), (8, 4), (9, 2)])
def test_drop_last_keeps_every_step_full_and_reshuffles_what_it_left_out(num_samples, size):
    epochs = [epoch_batches(num_samples, size, seed=s, drop_last=True) for s in range(6)]
    for batches in epochs:
        assert [len(b) for b in batches] == [size] * (num_samples // size)
        flat = [i for b in batches for i in b]
        assert len(set(flat)) == len(flat)
    # The samples one epoch leaves out are trained on in another: over a few epochs, all are seen.
    assert {i for batches in epochs for b in batches for i in b} == set(range(num_samples))


def test_drop_last_with_fewer_samples_than_one_batch_is_an_error_naming_the_option():
    with pytest.raises(ValueError, match="global-batch"):
        epoch_batches(3, 4, seed=0, drop_last=True)
