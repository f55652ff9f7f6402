from chatlearn.data.prompts import PromptDataset, filter_min_prompt_length, rank_by_length


def test_no_shuffle_cycles_in_file_order():
    ds = PromptDataset(list("abcde"), shuffle=False)
    assert ds.next_episode(3) == ["a", "b", "c"]
    assert ds.next_episode(4) == ["d", "e", "a", "b"]
    assert ds.next_episode(7) == ["c", "d", "e", "a", "b", "c", "d"]
    assert ds.consumed == 14 and ds.pass_number == 2


def test_shuffle_each_pass_is_a_fresh_seeded_permutation():
    data = list(range(10))
    ds = PromptDataset(data, seed=7)
    p0, p1 = ds.next_episode(10), ds.next_episode(10)
    assert sorted(p0) == data and sorted(p1) == data and p0 != p1
    assert PromptDataset(data, seed=7).next_episode(20) == p0 + p1
    assert PromptDataset(data, seed=8).next_episode(10) != p0


def test_state_dict_resume_sees_same_prompts():
    data = [{"prompt": str(i)} for i in range(7)]
    full = PromptDataset(data, seed=3)
    expected = [full.next_episode(4) for _ in range(6)]

    first = PromptDataset(data, seed=3)
    got = [first.next_episode(4) for _ in range(3)]
    state = first.state_dict()
    resumed = PromptDataset(data, seed=3)
    resumed.load_state_dict(state)
    got += [resumed.next_episode(4) for _ in range(3)]
    assert got == expected


def test_rank_and_filter():
    prompts = ["ccc", "a", "bb", "x", "dddd"]
    assert rank_by_length(prompts) == ["a", "x", "bb", "ccc", "dddd"]  # stable: a before x
    assert rank_by_length(prompts, descending=True) == ["dddd", "ccc", "bb", "a", "x"]
    tokenized = [{"input_ids": [1, 2, 3]}, {"input_ids": [1]}]
    assert filter_min_prompt_length(tokenized, 2) == [{"input_ids": [1, 2, 3]}]
    assert filter_min_prompt_length(prompts, 0) == prompts
    assert filter_min_prompt_length(prompts, 3, length_fn=lambda p: len(p) + 1) == ["ccc", "bb", "dddd"]
