"""What train.py and eval.py share: a tagger from its checkpoint, tagging sentences, entity-level scores."""

import torch
from seqeval.metrics import classification_report
from seqeval.scheme import IOBES

from gru.corpus import collate, make_batches, split_points, tags_to_spans
from gru.model import Tagger, TaggerConfig
from gru.runs import RunError


def tagger_from_checkpoint(checkpoint: dict, device: torch.device) -> Tagger:
    """Rebuild the tagger saved in a checkpoint (loaded on the CPU), in eval mode, on `device`."""
    try:
        model = Tagger(TaggerConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["model"])
    except (TypeError, ValueError, RuntimeError) as error:
        reason = str(error).splitlines()[0][:100]
        raise RunError(f"the checkpoint's weights do not fit its config ({reason})") from None
    return model.to(device).eval()


def predict(model, sentences, char_to_id, tags, device, batch_size=256) -> list[list[str]]:
    """Predicted tag strings for each (chars, tags) sentence, in the given order."""
    tag_to_id = {tag: i for i, tag in enumerate(tags)}
    predictions = [None] * len(sentences)
    model.eval()
    for indices in make_batches(sentences, batch_size):
        char_ids, _, lengths = collate(sentences, indices, char_to_id, tag_to_id, device)
        for index, path in zip(indices, model.decode(char_ids, lengths)):
            predictions[index] = [tags[tag_id] for tag_id in path]
    return predictions


def to_iobes(tags: list[str]) -> list[str]:
    """BMES is IOBES with M- for I-: rename so seqeval reads it."""
    return [("I-" + tag[2:]) if tag.startswith("M-") else tag for tag in tags]


def entity_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict:
    """Entity-level precision/recall/F1 per type and overall (seqeval, strict mode, IOBES scheme).

    Strict mode counts an entity as found only when its start, end and type all match the gold entity.
    """
    report = classification_report(
        [to_iobes(t) for t in gold], [to_iobes(t) for t in predicted],
        mode="strict", scheme=IOBES, output_dict=True, zero_division=0,
    )
    scores = {kind: {k: float(v) for k, v in values.items()} for kind, values in report.items()}
    overall = scores.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
    return {
        "f1": overall["f1-score"], "precision": overall["precision"], "recall": overall["recall"],
        "per_type": {kind: values for kind, values in scores.items() if "avg" not in kind},
    }


def is_chinese(char: str) -> bool:
    """A CJK ideograph (the basic block and extension A): the characters MSRA is written in."""
    return "\u3400" <= char <= "\u9fff"


def in_a_word(char: str) -> bool:
    """A letter or digit of a script that writes words with spaces between them (Latin, Cyrillic, digits...)."""
    return char.isalnum() and not is_chinese(char)


def whole_words(text: str, start: int, end: int) -> tuple[int, int]:
    """The span text[start:end] without the spaces at its ends, widened so that it does not cut a word in two.

    The tagger reads one character at a time and may end an entity inside a word such as "visited"; the entity
    then takes the whole word. A span of spaces only comes back empty (start == end).
    """
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    if start == end:
        return start, end
    while start > 0 and in_a_word(text[start - 1]) and in_a_word(text[start]):
        start -= 1
    while end < len(text) and in_a_word(text[end - 1]) and in_a_word(text[end]):
        end += 1
    return start, end


def tag_text(model, text: str, char_to_id, tags, device, max_length: int) -> list[tuple[int, int, str, str]]:
    """Entities in free text as (start, end, type, surface), where surface == text[start:end] in the text as given.

    Spaces at the ends of the text are not tagged (MSRA has none); a long text is cut at punctuation into pieces;
    no entity starts or ends with a space or inside a word (whole_words), and one that would overlap the entity
    before it after widening is left out.
    """
    first = len(text) - len(text.lstrip())  # where the tagged text starts in the text as given
    chars = list(text.strip())
    if not chars:
        raise RunError("the text to tag is empty")
    if not any(is_chinese(char) for char in chars):
        raise RunError("the text has no Chinese characters: this tagger was trained on Chinese news text")
    bounds = [0, *split_points(chars, max_length), len(chars)]
    pieces = [(chars[a:b], ["O"] * (b - a)) for a, b in zip(bounds, bounds[1:])]
    predicted = predict(model, pieces, char_to_id, tags, device)
    entities = []
    for offset, piece_tags in zip(bounds, predicted):
        for start, end, kind in tags_to_spans(piece_tags):
            start, end = whole_words(text, first + offset + start, first + offset + end)
            if start < end and (not entities or entities[-1][1] <= start):
                entities.append((start, end, kind, text[start:end]))
    return entities
