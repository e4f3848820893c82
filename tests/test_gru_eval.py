"""gru/eval.py as a user meets it: --tag reports spans of the text as given, never cutting a word, and the confusion
picture's path is checked before any work, with a part of the test set never replacing the whole test set's picture."""

from pathlib import Path

import pytest
import torch

import gru.eval as eval_script
from gru.corpus import PAD, TAGS, UNK
from gru.model import Tagger, TaggerConfig
from gru.tagging import tag_text


class ScriptedTagger:
    """Stands in for a trained tagger: every character in `inside` belongs to a LOC entity, all others are O.

    A run of such characters becomes one entity (B- M- ... E-, or S- for a single one), so a test chooses the spans.
    """

    def __init__(self, inside: str, char_to_id: dict):
        self.inside_ids = {char_to_id[char] for char in inside}
        self.tag_to_id = {tag: i for i, tag in enumerate(TAGS)}

    def eval(self):
        return self

    def decode(self, char_ids, lengths):
        paths = []
        for row, length in zip(char_ids.tolist(), lengths.tolist()):
            marks = [char_id in self.inside_ids for char_id in row[:length]]
            tags = ["O"] * length
            position = 0
            while position < length:
                if not marks[position]:
                    position += 1
                    continue
                end = position
                while end < length and marks[end]:
                    end += 1
                tags[position:end] = ["S-LOC"] if end - position == 1 else \
                    ["B-LOC"] + ["M-LOC"] * (end - position - 2) + ["E-LOC"]
                position = end
            paths.append([self.tag_to_id[tag] for tag in tags])
        return paths


def tag_with(text: str, inside: str):
    """tag_text on `text` with a ScriptedTagger that puts the characters of `inside` into entities."""
    vocab = [PAD, UNK, *sorted(set(text) | set(inside))]
    char_to_id = {char: i for i, char in enumerate(vocab)}
    return tag_text(ScriptedTagger(inside, char_to_id), text, char_to_id, TAGS, "cpu", 100)


def test_tag_spans_are_offsets_into_the_text_as_given_even_after_leading_spaces():
    sentence = "中国人民银行行长在北京发表讲话"
    entity_chars = "中国人民银北京"
    without_spaces = tag_with(sentence, entity_chars)
    assert [surface for *_, surface in without_spaces] == ["中国人民银", "北京"]
    for spaces in ("  ", "\t \n", "　"):  # ASCII spaces, a tab and a line break, an ideographic space
        text = spaces + sentence + "  "
        entities = tag_with(text, entity_chars)
        assert [(start - len(spaces), end - len(spaces), kind, surface) for start, end, kind, surface in entities] \
            == without_spaces
        assert all(text[start:end] == surface for start, end, _, surface in entities)


def test_tag_spans_never_cut_a_word_nor_start_or_end_on_a_space():
    text = "他在北京 😀 visited了博物馆，and 2024年"
    # the tagger's entities: 北 through "visi" of "visited"; the space before "2024" alone; the "0" of "2024"
    entities = tag_with(text, "北京 😀vis0")
    assert [(start, end, surface) for start, end, _, surface in entities] == [(2, 14, "北京 😀 visited"),
                                                                              (23, 27, "2024")]
    assert all(text[start:end] == surface for start, end, _, surface in entities)
    # an entity that the tagger ends on a space ends before it
    assert [surface for *_, surface in tag_with("我在北京 很好", "北京 ")] == ["北京"]


def test_tag_spans_of_a_long_text_cut_into_pieces_stay_offsets_into_it():
    text = "  " + "我在北京工作，" * 40  # 282 characters: three pieces at --max-length 100
    entities = tag_with(text, "北京")
    assert len(entities) == 40 and all(text[start:end] == "北京" for start, end, _, _ in entities)


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    """An untrained tagger saved as train.py saves one (only the fields eval.py reads), in its own run folder."""
    vocab = [PAD, UNK, *"中国北京人民银行"]
    config = TaggerConfig(vocab_size=len(vocab), num_tags=len(TAGS), embedding_dim=8, hidden_size=8)
    torch.manual_seed(0)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": Tagger(config).state_dict(), "config": config.to_dict(), "vocab": vocab, "tags": TAGS},
               run / "best.pt")
    return run / "best.pt"


def one_line_error(capsys, arguments) -> str:
    """Run eval.py's main; it must fail with exactly one `error:` line on stderr and nothing on stdout."""
    code = eval_script.main([str(argument) for argument in arguments])
    out, err = capsys.readouterr()
    assert code == 1 and out == "" and err.startswith("error: ") and len(err.splitlines()) == 1, (code, out, err)
    return err


def test_a_confusion_path_that_cannot_be_written_is_refused_before_the_test_set_is_read(tiny_checkpoint, capsys,
                                                                                         monkeypatch, tmp_path):
    def no_work(*arguments, **options):
        raise AssertionError("the test set was read before the output path was checked")

    monkeypatch.setattr(eval_script, "load_file", no_work)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for path, reason in ((tmp_path / "missing" / "c.png", "does not exist"), (tmp_path, "must name a .png file"),
                         (tmp_path / "c.jpg", "must name a .png file"), (a_file / "c.png", "does not exist")):
        err = one_line_error(capsys, ["--checkpoint", tiny_checkpoint, "--confusion-png", path])
        assert reason in err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file", "run"]
    assert sorted(path.name for path in tiny_checkpoint.parent.iterdir()) == ["best.pt"]


def test_a_limited_evaluation_draws_its_own_picture_and_leaves_the_whole_test_sets_alone(tiny_checkpoint, capsys):
    whole = tiny_checkpoint.parent / "confusion.png"
    whole.write_bytes(b"the picture of the whole test set")
    assert eval_script.main(["--checkpoint", str(tiny_checkpoint), "--limit", "20", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    part = tiny_checkpoint.parent / "confusion-first-20.png"
    assert part.read_bytes().startswith(b"\x89PNG") and f"of 20 test sentences drawn to {part}" in out
    assert whole.read_bytes() == b"the picture of the whole test set"


@pytest.mark.slow
def test_the_eval_cli_refuses_a_missing_folder_in_one_line_without_a_traceback(tiny_checkpoint, run_cli):
    result = run_cli("gru/eval.py", "--checkpoint", str(tiny_checkpoint), "--confusion-png", "/nonexistent/dir/c.png",
                     env={"OMP_NUM_THREADS": "1"}, timeout=120)
    assert result.returncode == 1 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr == ("error: --confusion-png /nonexistent/dir/c.png: the folder /nonexistent/dir "
                             "does not exist\n")
