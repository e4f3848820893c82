"""Continuous batching: the conversations of many clients decoded together, one new token per row per step.

    engine = Engine(model, max_batch=16); engine.start()
    engine.submit(Request(prompt_ids, max_new_tokens=64, sampling=Sampling(), stop_ids={2}, emit=print))

Generating one token reads every weight of the model from memory, and on a CPU that reading, not the arithmetic,
sets the pace. A batch of B rows reads the weights once for B tokens, so B conversations advance for little more
than the price of one. The rows are of different lengths, so each row keeps its own length in the cache, its new
token is rotated by its own position, and an attention mask hides the cache columns past its end.

Requests join the running batch between two steps (their prompt is read on its own first, then copied into a free
row of the cache) and leave it the step they end, so a short answer never waits for a long one, and a client that
went away frees its row at once.
"""

import queue
import sys
import threading
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llm.conversation import PREFILL_CHUNK, Sampling, pick_token
from llm.model import KVCache, Llama


class BatchKVCache:
    """Keys and values of up to `slots` sequences of different lengths; row b writes its next key at lengths[b].

    Rows 0..rows-1 are in use. The cache grows along the positions as the longest row needs (by doubling).
    """

    def __init__(self, model: Llama, slots: int, capacity: int = 256):
        weight = model.embedding.weight
        self.config, self.device, self.dtype = model.config, weight.device, weight.dtype
        self.window = model.rope_cos.size(0)
        self.keys = self.values = None
        self.allocate(slots, min(capacity, self.window))
        self.lengths = torch.zeros(slots, dtype=torch.long, device=self.device)  # positions filled, per row
        self.rows = 0

    def allocate(self, slots: int, capacity: int):
        shape = (self.config.n_layers, slots, self.config.n_kv_heads, capacity, self.config.head_dim)
        keys = torch.zeros(shape, device=self.device, dtype=self.dtype)
        values = torch.zeros(shape, device=self.device, dtype=self.dtype)
        if self.keys is not None:  # keep what the rows hold
            kept = self.keys.size(3)
            keys[:, :, :, :kept], values[:, :, :, :kept] = self.keys, self.values
        self.keys, self.values = keys, values

    def make_room(self, length: int):
        """Room for `length` positions in every row."""
        if length > self.keys.size(3):
            self.allocate(self.keys.size(1), min(self.window, max(length, 2 * self.keys.size(3))))

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        """Store each row's new key/value (rows, n_kv_heads, 1, hd) at its own length; return every row's keys
        and values up to the longest row, each (rows, n_kv_heads, longest + 1, hd)."""
        rows = torch.arange(self.rows, device=self.device)
        lengths = self.lengths[: self.rows]
        self.keys[layer][rows, :, lengths] = key[:, :, 0]  # row b, every head, column lengths[b]
        self.values[layer][rows, :, lengths] = value[:, :, 0]
        return self.keys[layer, : self.rows, :, : self.end], self.values[layer, : self.rows, :, : self.end]

    def begin_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The positions (rows, 1) of the tokens about to be read, and the mask (rows, 1, 1, longest + 1) that
        lets each of them see its own row's cached keys and itself, and nothing past its row's end."""
        lengths = self.lengths[: self.rows]
        self.end = int(lengths.max()) + 1
        self.make_room(self.end)
        columns = torch.arange(self.end, device=self.device)  # (longest + 1,)
        mask = columns[None, :] <= lengths[:, None]  # (rows, longest + 1)
        return lengths[:, None], mask[:, None, None, :]

    def end_step(self):
        self.lengths[: self.rows] += 1

    def add_row(self, single: KVCache) -> int:
        """Copy a one-sequence cache (filled by reading a prompt) into the next free row; return the row."""
        row, length = self.rows, single.length
        self.make_room(length)
        self.keys[:, row, :, :length] = single.keys[:, 0, :, :length]
        self.values[:, row, :, :length] = single.values[:, 0, :, :length]
        self.lengths[row] = length
        self.rows += 1
        return row

    def remove_row(self, row: int):
        """Free a row by moving the last row into it (one row is copied, whatever the batch size)."""
        last = self.rows - 1
        if row != last:
            length = int(self.lengths[last])
            self.keys[:, row, :, :length] = self.keys[:, last, :, :length]
            self.values[:, row, :, :length] = self.values[:, last, :, :length]
            self.lengths[row] = length
        self.rows -= 1


@dataclass
class Request:
    """One generation: the prompt, when to stop, and where its tokens go.

    emit(token_id, None) is called (from the engine's thread) for every generated token, then once
    emit(None, finish_reason) with "stop" (a stop token), "length" (max_new_tokens or the end of the context),
    "cancelled" (cancel() was called) or "error".
    """

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    stop_ids: set
    emit: Callable
    generator: torch.Generator | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: int = 0
    next_token: int = 0
    counts: Counter = field(default_factory=Counter)  # how often each token was generated (for the penalties)

    def cancel(self):
        self.cancelled.set()


class Engine:
    """A thread that owns the model: it admits waiting requests into the batch and steps the batch."""

    def __init__(self, model: Llama, max_batch: int = 16):
        self.model, self.max_batch = model.eval(), max_batch
        self.window = model.rope_cos.size(0)
        self.cache = BatchKVCache(model, max_batch)
        self.rows: list[Request] = []  # rows[b] is decoded in cache row b
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.batch_sizes = Counter()  # decode steps per batch size, to see the batching at work
        self.tokens_generated = 0
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self.run, name="engine", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        self.closing.set()
        self.thread.join(timeout=10)

    def submit(self, request: Request):
        self.waiting.put(request)

    def stats(self) -> dict:
        return {"running": len(self.rows), "waiting": self.waiting.qsize(), "tokens_generated": self.tokens_generated,
                "decode_steps": sum(self.batch_sizes.values()),
                "decode_steps_by_batch_size": dict(sorted(self.batch_sizes.items()))}

    @torch.inference_mode()
    def run(self):
        while not self.closing.is_set():
            try:
                self.admit()
                if self.rows:
                    self.step()
            except Exception:  # noqa: BLE001 - a failed step ends the requests in it, never the server
                traceback.print_exc(file=sys.stderr)
                for request in self.rows:
                    request.emit(None, "error")
                self.rows, self.cache.rows = [], 0

    def admit(self):
        """Move waiting requests into free rows: read each one's prompt, then choose its first token."""
        while len(self.rows) < self.max_batch:
            try:  # with nothing to decode, wait here (briefly, so that closing is noticed)
                request = self.waiting.get(timeout=0.05) if not self.rows else self.waiting.get_nowait()
            except queue.Empty:
                return
            if request.cancelled.is_set():
                request.emit(None, "cancelled")
                continue
            try:
                logits, single = self.read_prompt(request.prompt_ids)
            except Exception:  # noqa: BLE001 - this request alone fails
                traceback.print_exc(file=sys.stderr)
                request.emit(None, "error")
                continue
            self.cache.add_row(single)
            self.rows.append(request)
            if self.choose(request, logits, int(self.cache.lengths[len(self.rows) - 1])):
                self.remove([len(self.rows) - 1])

    def read_prompt(self, prompt_ids: list[int]) -> tuple[torch.Tensor, KVCache]:
        """The prompt through the model, alone, in chunks: its cache and the scores (vocab,) of the next token."""
        weight = self.model.embedding.weight
        single = KVCache(self.model.config, 1, len(prompt_ids), weight.device, weight.dtype)
        for start in range(0, len(prompt_ids), PREFILL_CHUNK):
            chunk = torch.tensor([prompt_ids[start : start + PREFILL_CHUNK]], device=weight.device)  # (1, T)
            logits, _ = self.model(chunk, cache=single, last_only=True)  # (1, 1, vocab)
        return logits[0, -1], single

    def step(self):
        """One decode step of the whole batch: every row reads its last token and chooses its next."""
        tokens = torch.tensor([[request.next_token] for request in self.rows], device=self.cache.device)  # (B, 1)
        positions, mask = self.cache.begin_step()
        logits, _ = self.model(tokens, cache=self.cache, positions=positions, attention_mask=mask)  # (B, 1, vocab)
        self.cache.end_step()
        self.batch_sizes[len(self.rows)] += 1
        lengths = self.cache.lengths.tolist()
        finished = [row for row, request in enumerate(self.rows) if self.choose(request, logits[row, -1], lengths[row])]
        self.remove(finished)

    def choose(self, request: Request, logits: torch.Tensor, length: int) -> bool:
        """Pick a request's next token and hand it over; True when the request has ended."""
        if request.cancelled.is_set():
            request.emit(None, "cancelled")
            return True
        token = pick_token(logits, request.sampling, request.generator, request.counts)
        if token in request.stop_ids:
            request.emit(None, "stop")
            return True
        request.counts[token] += 1
        request.generated += 1
        self.tokens_generated += 1
        request.emit(token, None)
        if request.generated >= request.max_new_tokens or length >= self.window:  # no position left to read it
            request.emit(None, "length")
            return True
        request.next_token = token
        return False

    def remove(self, rows: list[int]):
        """Take ended rows out of the batch, from the highest, so that the row moved into a gap never ended."""
        for row in sorted(rows, reverse=True):
            self.cache.remove_row(row)
            self.rows[row] = self.rows[-1]
            self.rows.pop()
