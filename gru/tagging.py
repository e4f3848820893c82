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


def tag_text(model, text: str, char_to_id, tags, device, max_length: int) -> list[tuple[int, int, str, str]]:
    """Entities in free text as (start, end, type, surface), long text cut at punctuation into pieces."""
    text = text.strip()
    if not text:
        raise RunError("the text to tag is empty")
    chars = list(text)
    if not any("\u3400" <= char <= "\u9fff" for char in chars):
        raise RunError("the text has no Chinese characters: this tagger was trained on Chinese news text")
    bounds = [0, *split_points(chars, max_length), len(chars)]
    pieces = [(chars[a:b], ["O"] * (b - a)) for a, b in zip(bounds, bounds[1:])]
    predicted = predict(model, pieces, char_to_id, tags, device)
    entities = []
    for offset, piece_tags in zip(bounds, predicted):
        for start, end, kind in tags_to_spans(piece_tags):
            entities.append((offset + start, offset + end, kind, text[offset + start : offset + end]))
    return entities

