"""A conversation with a chat model: the text it reads, the next token it picks, and a KV cache kept across turns.

    session = ChatSession(model, tokenizer, system="You are terse.")
    for text in session.reply("What is the capital of France?", Sampling(temperature=0)):
        print(text, end="", flush=True)

Every turn the whole conversation is written out again in the model's chat template and tokenized. The cache
already holds the keys and values of the tokens the model read or wrote in earlier turns; comparing the new ids
with the cached ones token by token finds how much of the cache is still valid, and only the rest (the new user
message and the start of the answer) is read. Reading the new tokens is one forward pass over all of them (the
prefill); writing the answer is one forward pass per token (the decode).
"""

import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from llm.chat_template import IncrementalDecoder
from llm.generate import filter_logits
from llm.model import KVCache, Llama

PREFILL_CHUNK = 256  # tokens read per forward pass: bounds the memory of a long prompt and lets Ctrl-C in between


@dataclass
class Sampling:
    """How the next token is chosen from the model's scores."""

    temperature: float = 0.2  # 0 = always the most likely token (greedy)
    top_p: float = 0.9  # keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep only the k most likely tokens (0 = all)
    frequency_penalty: float = 0.0  # subtracted from a token's score once per time the answer already holds it
    presence_penalty: float = 0.0  # subtracted from a token's score once if the answer already holds it


def penalize(logits: torch.Tensor, counts: Counter | None, sampling: Sampling) -> torch.Tensor:
    """The OpenAI API's penalties against repetition: for each token j that the answer so far holds c_j times,

        logits_j - c_j * frequency_penalty - presence_penalty      (tokens not yet written are unchanged)

    Positive values make a repeated token less likely, and the frequency penalty the more so the more often it
    came; negative values favour repetition. logits (vocab,) -> a penalized copy (vocab,) in fp32, or logits
    themselves when there is nothing to subtract."""
    if not counts or not (sampling.frequency_penalty or sampling.presence_penalty):
        return logits
    logits = logits.float().clone()
    ids = torch.tensor(list(counts.keys()), device=logits.device)  # (distinct tokens so far,)
    times = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
    logits[ids] -= times * sampling.frequency_penalty + sampling.presence_penalty
    return logits


def pick_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None,
               counts: Counter | None = None) -> int:
    """logits (vocab,) -> the next token id: the most likely one at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top_k tokens and the top_p nucleus; first penalized for the
    tokens counted in `counts` (how often each was written so far in this answer), when penalties are set."""
    logits = penalize(logits, counts, sampling)
    if sampling.temperature == 0:
        return int(logits.argmax())
    scaled = logits.float().unsqueeze(0) / sampling.temperature  # (1, vocab)
    probabilities = filter_logits(scaled, sampling.top_k, sampling.top_p).softmax(dim=-1)  # (1, vocab)
    return int(torch.multinomial(probabilities, 1, generator=generator))


def common_prefix_length(first: list[int], second: list[int]) -> int:
    """How many leading ids the two lists share."""
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length


def print_notice(message: str):
    print(message, file=sys.stderr, flush=True)


class ContextFull(ValueError):
    """The newest message alone does not fit in the model's context; printed as one line."""


class ChatSession:
    """One conversation: its messages, and a KV cache holding the tokens the model has already read."""

    def __init__(self, model: Llama, tokenizer, system: str | None = None, notice=print_notice):
        self.model, self.tokenizer, self.notice = model.eval(), tokenizer, notice
        self.system = system  # None: the chat template's own default system prompt, if it has one
        self.turns: list[dict] = []  # user and assistant messages, oldest first
        self.window = model.rope_cos.size(0)  # the most positions the model can place
        self.cache: KVCache | None = None
        self.cached_ids: list[int] = []  # the tokens whose keys and values the cache holds, in order
        self.finish_reason = None  # why the last answer ended: stop, length, interrupted

    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.turns

    def reset(self):
        """Forget the turns (the system prompt stays); the cache is reused where it still matches."""
        self.turns = []

    def prompt_ids(self) -> list[int]:
        """The conversation in the model's chat template, ending where the assistant's answer begins, as ids."""
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(self.messages(), add_generation_prompt=True))

    def fit_to_context(self, room: int) -> list[int]:
        """The prompt ids, after dropping the oldest turns until `room` tokens of answer fit after them.

        The system prompt and the newest user message always stay; if those alone leave no room at all, the newest
        message is taken back and ContextFull says why.
        """
        ids = self.prompt_ids()
        if len(ids) + room > self.window and len(self.turns) > 1:
            turns, self.turns = self.turns, self.turns[-1:]
            alone = len(self.prompt_ids())  # the system prompt and the newest message, nothing else
            self.turns = turns
            if alone >= self.window:
                self.turns.pop()
                raise ContextFull(f"this message makes a prompt of {alone} tokens and the model reads at most "
                                  f"{self.window}; shorten it (or the system prompt)")
        dropped = 0
        while len(ids) + room > self.window and len(self.turns) > 1:
            del self.turns[:2]  # the oldest user message and the answer to it
            dropped += 1
            ids = self.prompt_ids()
        if dropped:
            self.notice(f"note: the conversation outgrew the model's context of {self.window} tokens; dropped the "
                        f"oldest {dropped} exchange{'s' if dropped > 1 else ''} (the system prompt stays)")
        if len(ids) >= self.window:
            self.turns.pop()
            raise ContextFull(f"this message makes a prompt of {len(ids)} tokens and the model reads at most "
                              f"{self.window}; shorten it (or the system prompt)")
        return ids

    def ensure_cache(self, length: int):
        """A cache with room for `length` positions, keeping what it holds (it grows by doubling, up to the window)."""
        if self.cache is not None and self.cache.max_length >= length:
            return
        capacity = min(self.window, max(length, 2 * (self.cache.max_length if self.cache else 256)))
        weight = self.model.embedding.weight
        grown = KVCache(self.model.config, 1, capacity, weight.device, weight.dtype)
        if self.cache is not None:
            kept = len(self.cached_ids)
            grown.keys[:, :, :, :kept] = self.cache.keys[:, :, :, :kept]
            grown.values[:, :, :, :kept] = self.cache.values[:, :, :, :kept]
        self.cache = grown

    @torch.inference_mode()
    def read(self, ids: list[int], should_stop: Callable[[], bool] = lambda: False) -> torch.Tensor | None:
        """Run the model over `ids`, which follow the cached tokens; return the scores (vocab,) of the next token.

        None when should_stop() turned true between two chunks. cached_ids grows only after a forward pass
        completed, so an interrupt at any moment leaves the cache consistent with it.
        """
        self.ensure_cache(len(self.cached_ids) + len(ids))
        device = self.model.embedding.weight.device
        logits = None
        for start in range(0, len(ids), PREFILL_CHUNK):
            if start and should_stop():
                return None
            chunk = ids[start : start + PREFILL_CHUNK]
            self.cache.length = len(self.cached_ids)
            logits, _ = self.model(torch.tensor([chunk], device=device), cache=self.cache, last_only=True)  # (1, 1, V)
            self.cached_ids.extend(chunk)
        return logits[0, -1]  # (vocab,)

    def start_answer(self, room: int, should_stop) -> tuple[list[int], torch.Tensor | None]:
        """Read the part of the prompt the cache does not hold yet; return the prompt ids and the next scores."""
        ids = self.fit_to_context(room)
        reused = common_prefix_length(self.cached_ids, ids)
        reused = min(reused, len(ids) - 1)  # the last prompt token is read again: its output scores the answer
        del self.cached_ids[reused:]
        return ids, self.read(ids[reused:], should_stop)

    def reply(self, user_text: str, sampling: Sampling, max_new_tokens: int = 512, generator=None,
              should_stop: Callable[[], bool] = lambda: False) -> Iterator[str]:
        """Add a user message and stream the answer's text; the answer joins the conversation when it ends.

        The answer ends at a stop token (finish_reason "stop"), after max_new_tokens or at the end of the context
        ("length"), or when should_stop() turns true ("interrupted"; what was written so far is kept).
        """
        self.turns.append({"role": "user", "content": user_text})
        ids, logits = self.start_answer(min(max_new_tokens, self.window // 4), should_stop)
        budget = min(max_new_tokens, self.window - len(ids))
        decoder = IncrementalDecoder(self.tokenizer, ids)
        stop_ids = set(self.tokenizer.stop_ids)
        pieces, self.finish_reason = [], "length"
        counts = Counter()  # how often each token was written in this answer (the penalties' c_j)
        try:
            for step in range(budget):
                if logits is None or should_stop():
                    self.finish_reason = "interrupted"
                    break
                token = pick_token(logits, sampling, generator, counts)
                if token in stop_ids:
                    self.finish_reason = "stop"
                    break
                counts[token] += 1
                pieces.append(decoder.push(token))
                yield pieces[-1]
                if step + 1 < budget:  # the last token of the budget is never read: nothing follows it
                    logits = self.read([token])
            pieces.append(decoder.flush())
            yield pieces[-1]
        finally:  # also when the caller stops iterating (a second Ctrl-C): the answer so far stays in the history
            self.turns.append({"role": "assistant", "content": "".join(pieces)})
        if self.finish_reason == "length" and budget < max_new_tokens:
            self.notice(f"note: the answer reached the end of the model's context ({self.window} tokens)")
