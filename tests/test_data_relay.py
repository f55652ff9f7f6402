import pytest
import torch

from chatlearn.data.relay import EpisodeRelayBuffer, RelayBuffers


def episode(eid, n=4):
    return [{"ep": eid, "i": i, "t": torch.tensor([eid, i])} for i in range(n)]


def kept(relay):
    return [b.episode_id for b in relay.buffers]


def test_relay_off_keeps_only_current_episode():
    relay = RelayBuffers(max_relay_episode=0)
    for e in range(3):
        relay.add(e, episode(e))
        assert [(s["ep"], s["i"]) for s in relay.select(e, num_samples=2)] == [(e, i) for i in range(4)]
    assert kept(relay) == [2]


def test_relay_all_and_last_n():
    everything = RelayBuffers(max_relay_episode=-1)
    last2 = RelayBuffers(max_relay_episode=2)
    for e in range(4):
        everything.add(e, episode(e))
        last2.add(e, episode(e))
    assert kept(everything) == [0, 1, 2, 3]
    assert kept(last2) == [2, 3]
    picked = last2.select(3)
    assert len(picked) == 4 and {s["ep"] for s in picked} <= {2, 3}


def test_relay_offset_keeps_nothing_before_it():
    relay = RelayBuffers(max_relay_episode=-1, relay_episode_offset=2)
    relay.add(0, episode(0))
    relay.add(1, episode(1))
    assert kept(relay) == [1] and [s["ep"] for s in relay.select(1)] == [1] * 4
    relay.add(2, episode(2))
    assert kept(relay) == [2]
    relay.add(3, episode(3))
    assert kept(relay) == [2, 3]


def test_default_sampler_is_deterministic_without_replacement():
    def build(seed):
        relay = RelayBuffers(max_relay_episode=3, seed=seed)
        for e in range(3):
            relay.add(e, episode(e, n=5))
        return relay

    def keys(seed):
        return [(s["ep"], s["i"]) for s in build(seed).select(2, num_samples=8)]

    assert keys(1) == keys(1)
    assert len(set(keys(1))) == 8
    assert keys(1) == sorted(keys(1))  # returned oldest episode first
    assert keys(1) != keys(2)
    assert len(build(1).select(2)) == 5  # default: size of the current episode
    with pytest.raises(ValueError, match="without replacement"):
        build(1).select(2, num_samples=16)


def test_custom_relay_sample_fn_and_validation():
    relay = RelayBuffers(max_relay_episode=2)
    relay.add(0, episode(0))
    relay.add(1, episode(1))
    seen = []

    def newest_half_each(buffers):
        seen.append([b.episode_id for b in buffers])
        assert all(isinstance(b, EpisodeRelayBuffer) for b in buffers)
        return [s for b in buffers for s in b.buffer[:2]]

    out = relay.select(1, relay_sample_fn=newest_half_each)
    assert seen == [[0, 1]] and [(s["ep"], s["i"]) for s in out] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    with pytest.raises(ValueError, match="empty"):
        relay.select(1, relay_sample_fn=lambda bufs: [])
    with pytest.raises(TypeError, match="list of sample dicts"):
        relay.select(1, relay_sample_fn=lambda bufs: bufs[0])
    with pytest.raises(TypeError, match="item 0"):
        relay.select(1, relay_sample_fn=lambda bufs: ["x"])


def test_select_must_name_latest_episode():
    relay = RelayBuffers(max_relay_episode=2)
    relay.add(0, episode(0))
    with pytest.raises(ValueError, match="latest"):
        relay.select(1)
    relay.add(1, episode(1))
    with pytest.raises(ValueError, match="increasing"):
        relay.add(0, episode(0))


def test_state_dict_round_trip_gives_identical_future(tmp_path):
    def run(relay, episodes):
        out = []
        for e in episodes:
            relay.add(e, episode(e))
            out.append([(s["ep"], s["i"]) for s in relay.select(e, num_samples=4)])
        return out

    expected = run(RelayBuffers(max_relay_episode=3, seed=5), range(6))
    first = RelayBuffers(max_relay_episode=3, seed=5)
    got = run(first, range(3))
    torch.save(first.state_dict(), tmp_path / "relay.pt")
    resumed = RelayBuffers(max_relay_episode=3, seed=5)
    resumed.load_state_dict(torch.load(tmp_path / "relay.pt", weights_only=False))
    assert kept(resumed) == [0, 1, 2]
    assert torch.equal(resumed.buffers[0].buffer[1]["t"], torch.tensor([0, 1]))
    got += run(resumed, range(3, 6))
    assert got == expected
