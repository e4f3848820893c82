"""The instruction sets: each chapter's split reproduced item for item, answers that read back, no test item trained."""

import json

import pytest

from data import DataError
from llm import instructions
from llm.instructions import (
    entity_answer,
    entity_f1,
    hf_examples,
    sample_examples,
    surname_is_right,
    tags_from_answer,
    training_mixture,
)


def test_translation_split_selects_exactly_the_transformer_chapters_pairs():
    from transformer.prepare import load_pairs, split_pairs

    theirs = split_pairs(load_pairs())
    ours = instructions.tatoeba_split(instructions.tatoeba_pairs())
    for name in ("train", "valid", "test"):
        assert ours[name] == theirs[name], name
    assert len(ours["test"]) > 4000


def test_surname_split_selects_exactly_the_rnn_chapters_names():
    from rnn.names import load_pairs, stratified_split

    theirs = stratified_split(load_pairs(), 0)
    ours = instructions.surname_split(instructions.surname_pairs())
    for name in ("train", "validation", "test"):
        assert ours[name] == theirs[name], name


def test_entity_sets_are_exactly_the_gru_chapters_sentences():
    from gru.corpus import load_file, load_msra

    train, validation = load_msra(2500, 100, 0, log=lambda message: None)
    test = load_file("test", 100, log=lambda message: None)
    ours = instructions.msra_split()
    assert ours["train"] == train and ours["validation"] == validation and ours["test"] == test


def test_chitchat_split_is_disjoint_and_reproducible():
    conversations = instructions.chitchat_conversations()
    first, second = (instructions.chitchat_split(conversations) for _ in range(2))
    assert first == second
    ids = {name: {key for key, _ in first[name]} for name in first}
    assert not ids["train"] & ids["test"] and not ids["train"] & ids["valid"] and not ids["valid"] & ids["test"]
    assert sum(len(part) for part in ids.values()) == len(conversations)
    example = instructions.chitchat_example(first["test"][0][1])
    roles = [message["role"] for message in example.messages]
    assert roles[0] == "user" and roles[-1] == "assistant" and roles == ["user", "assistant"] * (len(roles) // 2)


def test_training_mixture_never_holds_a_test_item():
    examples = training_mixture({"translation": 3000, "surnames": 1500, "entities": 800}, seed=5)
    test_english = {english for english, _ in instructions.task_splits("translation")["test"]}
    test_names = set(instructions.task_splits("surnames")["test"])  # (name, language): a name can have two
    test_sentences = {"".join(chars) for chars, _ in instructions.task_splits("entities")["test"]}
    train_sentences = {"".join(chars) for chars, _ in instructions.task_splits("entities")["train"]}
    for example in examples:
        question = example.messages[0]["content"]
        if example.task == "translation":
            english = example.extra["source"] if question.startswith("Translate to Spanish") else example.reference
            assert english not in test_english
        elif example.task == "surnames":
            assert (question.split("surname ")[1].split(" come from")[0], example.reference) not in test_names
        else:
            sentence = question.split(": ", 1)[1]
            assert sentence in train_sentences  # drawn from the train file (whose text may recur in the test file)
    assert {example.task for example in examples} == {"translation", "surnames", "entities"}
    assert len(examples) == 5300 and len(test_sentences) > 0


def test_held_out_samples_are_the_same_for_every_call_and_ask_for_spanish():
    first = sample_examples("translation", "test", 50, seed=0)
    assert [e.messages for e in first] == [e.messages for e in sample_examples("translation", "test", 50, seed=0)]
    assert all(e.messages[0]["content"].startswith("Translate to Spanish: ") for e in first)
    test_pairs = set(instructions.task_splits("translation")["test"])
    assert all((e.extra["source"], e.reference) in test_pairs for e in first)


def test_entity_answer_reads_back_into_the_gold_tags():
    chars = list("新华社北京电江泽民在北京会见了客人")
    tags = ["B-ORG", "M-ORG", "E-ORG", "B-LOC", "E-LOC", "O", "B-PER", "M-PER", "E-PER", "O", "B-LOC", "E-LOC",
            "O", "O", "O", "O", "O"]
    answer = entity_answer(chars, tags)
    assert answer == "person: 江泽民\nplace: 北京\norganisation: 新华社"
    assert tags_from_answer(answer, chars) == tags
    assert tags_from_answer("person: none\nplace: none\norganisation: none", chars) == ["O"] * len(chars)
    assert tags_from_answer("I do not know.", chars) == ["O"] * len(chars)
    assert tags_from_answer("Person: 江泽民，新华\nplace: 上海", chars)[6:9] == ["B-PER", "M-PER", "E-PER"]


def test_entity_answers_of_the_test_set_read_back_almost_perfectly():
    """The answer format loses little: strict F1 of the gold answers read back, against the gold tags."""
    pieces = instructions.task_splits("entities")["test"]
    gold = [tags for _, tags in pieces]
    read_back = [tags_from_answer(entity_answer(chars, tags), chars) for chars, tags in pieces]
    assert 0.99 < entity_f1(gold, read_back) < 1.0
    assert entity_f1(gold, gold) == 1.0


def test_surname_answers_are_judged_by_the_first_language_they_name():
    assert surname_is_right("Russian", "Russian")
    assert surname_is_right("russian.", "Russian")
    assert surname_is_right("The surname Abaimov comes from Russian.", "Russian")
    assert surname_is_right("Italian (common in Sicily, like some Greek names)", "Italian")
    assert not surname_is_right("Polish or Russian", "Russian")
    assert not surname_is_right("The surname Abaimov", "Russian")
    assert not surname_is_right("", "Russian")
    assert sorted(instructions.SURNAME_LANGUAGES) == sorted({lang for _, lang in instructions.surname_pairs()})


def test_hf_dataset_reads_messages_and_sharegpt_conversations(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4"}]}]
    (tmp_path / "chat").mkdir()
    (tmp_path / "chat" / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    examples = hf_examples(str(tmp_path / "chat"))
    assert [e.messages for e in examples] == [row["messages"] for row in rows]
    sharegpt = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]}]
    (tmp_path / "sharegpt").mkdir()
    (tmp_path / "sharegpt" / "train.jsonl").write_text(json.dumps(sharegpt[0]) + "\n")
    assert hf_examples(str(tmp_path / "sharegpt"))[0].messages == [{"role": "user", "content": "Hi"},
                                                                  {"role": "assistant", "content": "Hey"}]
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "train.jsonl").write_text(json.dumps({"text": "no chat here"}) + "\n")
    with pytest.raises(DataError, match="no messages or conversations column"):
        hf_examples(str(tmp_path / "plain"))
