"""Conversations -> tokens with a loss mask, batched by length; a chat vocabulary for a model trained here.

What the model learns from a conversation is decided by one mask: a token is a training target only when it is
part of an assistant's answer or the end-of-turn token that closes it. The system prompt, the user's words and the
template's own markup (<|im_start|>user ...) are read, never imitated: a model trained on them learns to write the
user's side of the conversation too.

The text is rendered with the model's own chat template (jinja2, as its authors wrote it), cut at the boundaries
where each answer starts and ends, and each piece is tokenized on its own: the tokens of a prompt are exactly
the ones the model is given at inference time, when it is asked to continue after "<|im_start|>assistant\\n".
"""

import random

import torch

# ChatML, as SmolLM2's GGUF writes it, without its built-in system prompt: a model trained here gets this template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
    " + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")


def render_with_mask(tokenizer, messages: list, max_length: int | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, for each, whether it is an answer token (or its end token).

    tokenizer: encode(text) -> ids (special tokens in the text become their ids), apply_chat_template(messages,
    add_generation_prompt) -> text, stop_ids (the end-of-turn ids).
    """
    ids, mask, rendered = [], [], ""
    after_answer = False
    leading = tokenizer.encode("")  # what encode puts before any text (a BOS for some models): only once
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:index], add_generation_prompt=True)
        if not prompt.startswith(rendered):
            raise ValueError("this chat template does not render a conversation as a growing text; "
                             "its answers cannot be masked by prefixes")
        _append_context(tokenizer, prompt[len(rendered):], ids, mask, after_answer, leading)
        answer = without_prefix(tokenizer.encode(message["content"]), leading)
        ids += answer
        mask += [True] * len(answer)
        rendered, after_answer = prompt + message["content"], True
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    if not full.startswith(rendered):
        raise ValueError("this chat template changes earlier text when a turn is added; cannot mask its answers")
    _append_context(tokenizer, full[len(rendered):], ids, mask, after_answer, leading)
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return ids, mask


def without_prefix(pieces: list[int], leading: list[int]) -> list[int]:
    return pieces[len(leading):] if leading and pieces[: len(leading)] == leading else pieces


def _append_context(tokenizer, text: str, ids: list, mask: list, after_answer: bool, leading: list) -> None:
    """Tokens the model reads but does not learn to write; the first is learnt when it closes an answer."""
    pieces = tokenizer.encode(text) if text else []
    if ids:  # a BOS (or any prefix encode adds) belongs at the very start only
        pieces = without_prefix(pieces, leading)
    ids += pieces
    mask += [False] * len(pieces)
    if after_answer and pieces and pieces[0] in tokenizer.stop_ids:
        mask[len(ids) - len(pieces)] = True  # the end-of-turn token: the model must learn to stop


def encode_examples(tokenizer, examples, max_length: int) -> list[tuple[list[int], list[bool]]]:
    """(ids, mask) of each example, cut to max_length tokens; an example left with no answer token is dropped."""
    encoded = []
    for example in examples:
        ids, mask = render_with_mask(tokenizer, example.messages, max_length)
        if any(mask[1:]):  # the first token is never a target (nothing comes before it)
            encoded.append((ids, mask))
    return encoded


class LengthBuckets:
    """Global batches of examples of similar length, in a shuffled order: the batch of a step is a pure function
    of (seed, step), so a resumed run draws exactly the batches the uninterrupted one would have.

    Sorting by length (ties broken at random per epoch) means a batch pads its rows to nearly the same length:
    almost no compute goes to padding, and no example attends to another, as at inference.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        if len(lengths) < batch_size:
            raise ValueError(f"{len(lengths)} training examples are fewer than one batch of {batch_size}")
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.batches_per_epoch = len(lengths) // batch_size  # the last, incomplete batch is left out
        self._epoch, self._batches = None, None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1000 + epoch)
        noise = [rng.random() for _ in self.lengths]
        order = sorted(range(len(self.lengths)), key=lambda i: (self.lengths[i], noise[i]))
        order = order[: self.batches_per_epoch * self.batch_size]
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def batch(self, step: int) -> list[int]:
        epoch = step // self.batches_per_epoch
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self.epoch_batches(epoch)
        return self._batches[step % self.batches_per_epoch]


def collate(encoded, indices, pad_id: int, multiple: int = 1):
    """Right-padded inputs, targets (B, T) and the answer mask of the targets (B, T) of the given examples.

    Padding sits after every real token, so a causal model never attends to it; its targets are masked out.
    T is the longest example's length rounded up to a multiple of `multiple`: batches then come in a few shapes
    only, and the memory a step frees is reused by the next one of its shape (see sft.py --pad-to).
    """
    length = max(len(encoded[i][0]) for i in indices) - 1
    length += -length % multiple
    inputs = torch.full((len(indices), length), pad_id, dtype=torch.long)  # (B, T)
    targets = torch.full((len(indices), length), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(indices), length), dtype=torch.bool)  # (B, T)
    for row, index in enumerate(indices):
        ids, answer = encoded[index]
        inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1])
        targets[row, : len(ids) - 1] = torch.tensor(ids[1:])
        mask[row, : len(ids) - 1] = torch.tensor(answer[1:])
    return inputs, targets, mask


# ---------------------------------------------------------------- a chat vocabulary for a model trained here


def add_chat_pieces(model_bytes: bytes) -> bytes:
    """A SentencePiece model (its file's bytes) that has gained ChatML's two special tokens.

    They are appended to the model's protocol buffer as USER_DEFINED pieces (ids vocab_size and vocab_size + 1):
    SentencePiece then reads "<|im_start|>" in any text as one token, never spelling it out of smaller pieces.
    The "dummy prefix" (a space SentencePiece puts before every text it encodes, so that a text's first word is
    spelt as inside a sentence) is switched off: a conversation is encoded piece by piece, and a space before
    every piece would give "<|im_end|>" a stray token in front of it, which the rendered text does not have.
    """
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    proto.normalizer_spec.add_dummy_prefix = False
    present = {piece.piece for piece in proto.pieces}
    for token in CHAT_TOKENS:
        if token not in present:
            piece = proto.pieces.add()
            piece.piece, piece.score = token, 0.0
            piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return proto.SerializeToString()


def sentencepiece_chat_tokenizer(model_bytes: bytes):
    """The chat tokenizer of a model trained here: its SentencePiece vocabulary with the chat pieces, ChatML."""
    import sentencepiece as spm

    from llm.chat_model import CheckpointTokenizer

    processor = spm.SentencePieceProcessor(model_proto=add_chat_pieces(model_bytes))
    return CheckpointTokenizer(processor, CHATML_TEMPLATE)


@torch.no_grad()
def grow_vocabulary(model, vocab_size: int) -> int:
    """Give the embedding (and an untied output head) rows for new tokens; return how many were added.

    A new row starts as the mean of the existing rows. As an input it is then an "average token"; as an output,
    its logit h . mean(E) is the mean of the other logits, so the model starts giving it an ordinary, small
    probability: neither a token it can never produce (a row of zeros or -inf would still be reachable but
    meaningless) nor one that a random row could make suddenly likely.
    """
    old_size = model.embedding.weight.size(0)
    added = vocab_size - old_size
    if added <= 0:
        return 0
    matrices = [model.embedding] + ([model.output_proj] if model.output_proj is not None else [])
    for module in matrices:
        weight = module.weight  # (old_size, d_model)
        grown = torch.cat([weight, weight.mean(dim=0, keepdim=True).expand(added, -1)], dim=0)  # (vocab, d)
        module.weight = torch.nn.Parameter(grown, requires_grad=weight.requires_grad)
        if isinstance(module, torch.nn.Embedding):
            module.num_embeddings = vocab_size
        else:
            module.out_features = vocab_size
    model.config.vocab_size = vocab_size
    return added
