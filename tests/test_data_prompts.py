import pytest

from chatlearn.data.prompts import (PromptDataset, check_conversation, default_prompt_length, filter_min_prompt_length,
                                    is_conversation, rank_by_length)


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


SYSTEM = {"role": "system", "content": "Compute the sum."}  # 16 characters


def test_conversation_lengths_rank_and_filter():
    chat = [SYSTEM, {"role": "user", "content": "4+18="}]  # 16 + 5 characters of contents
    records = [{"prompt": "8-3="}, {"prompt": chat}, {"messages": [{"role": "user", "content": "12+7=?"}]},
               {"messages": None, "prompt": "1+1=1+1="}, {"prompt_ids": [1, 5, 6]}]
    # Characters of the contents (no tokenizer in the driver), never the number of messages.
    assert [default_prompt_length(r) for r in records] == [4, 21, 6, 8, 3]
    assert default_prompt_length(chat) == 21 and default_prompt_length(("a", "b")) == 2
    assert rank_by_length(records) == [records[4], records[0], records[2], records[3], records[1]]
    assert filter_min_prompt_length(records, 5) == records[1:4]
    assert is_conversation(chat) and not is_conversation([]) and not is_conversation([1, 2])


def test_check_conversation_names_the_fault():
    assert check_conversation((SYSTEM,), "r") == [SYSTEM]
    cases = [("not a list", "a conversation must be a list"), ([], "the conversation has no messages"),
             ([SYSTEM, {"role": "user"}], "message 1 must be a dict with string 'role' and 'content'"),
             ([SYSTEM, {"role": "user", "content": 5}], "message 1"),
             (["user: hi"], "message 0 .*'user: hi'"), ([1, 5, 6], r"message 0 .*token ids go in `prompt_ids`")]
    for value, match in cases:
        with pytest.raises(ValueError, match=f"^prompt record 7: {match}"):
            check_conversation(value, "prompt record 7")
