"""The built-in chat set (echo_mlx.datasets.chat): its split, its examples, and how answers are scored."""

from collections import Counter

import pytest

from echo_mlx.datasets import chat


def test_every_category_is_in_every_split_and_the_heldout_part_is_large_enough():
    prompts = chat.read_prompts()
    assert [p["id"] for p in prompts] == list(range(len(prompts)))
    splits = Counter(chat.split_of(p["id"]) for p in prompts)
    assert splits["heldout"] >= 30 and splits["valid"] >= 30 and splits["train"] > splits["heldout"] * 4
    for split in chat.SPLITS:
        assert {p["category"] for p in prompts if chat.split_of(p["id"]) == split} == {p["category"] for p in prompts}


def test_the_chat_file_answers_every_prompt_in_its_split():
    prompts = {p["id"]: p for p in chat.read_prompts()}
    records = chat.records()
    assert sorted(r["id"] for r in records) == sorted(prompts)
    for r in records:
        assert r["split"] == chat.split_of(r["id"])
        assert r["messages"][0] == {"role": "user", "content": prompts[r["id"]]["prompt"]}
        assert r["messages"][1]["role"] == "assistant" and r["messages"][1]["content"].strip()


def test_an_example_is_the_prompt_then_the_answer(smollm2):
    tokenizer = smollm2.tokenizer
    record = chat.records("train")[0]
    ids, n = chat.example(tokenizer, record)
    assert ids[:n] == chat.prompt_ids(tokenizer, record["messages"][0]["content"])
    answer = tokenizer.decode(ids[n:])
    assert record["messages"][1]["content"] in answer
    if record["finished"]:
        assert answer.rstrip().endswith("<|im_end|>")


def test_the_original_ranks_its_own_greedy_answers_first(smollm2):
    from echo_mlx.conversion.convert import unshared_model

    scores = chat.answer_scores(unshared_model(smollm2), smollm2.tokenizer, "heldout", limit=3)
    assert scores["answers"] == 3 and scores["tokens"] > 30
    assert scores["top1"] > 0.95 and scores["ppl"] < 3  # greedy tokens: ranked first, not certain


def test_an_unknown_split_is_refused():
    with pytest.raises(ValueError, match="unknown chat split"):
        chat.records("test")
