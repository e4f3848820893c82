"""Turning a trained model into translations: greedy decoding (with or without the KV cache) and beam search."""

import torch

from transformer.model import Transformer, reorder_state


@torch.inference_mode()
def greedy_decode(
    model: Transformer,
    source_ids: torch.Tensor,
    bos_id: int,
    eos_id: int,
    max_new_tokens: int,
    use_cache: bool = True,
    stop_at_eos: bool = True,
    return_logits: bool = False,
):
    """Pick the most likely next token at every step; source (B, Ts) -> generated ids (B, T) (padding after EOS).

    use_cache=True feeds one new token per step and reuses cached keys/values; use_cache=False re-runs the decoder
    over the whole prefix each step (what the cache saves). Both must give the same tokens and logits.
    """
    pad_id = model.config.pad_id
    batch = source_ids.size(0)
    max_new_tokens = min(max_new_tokens, model.config.max_len - 1)
    # BOS, then room for every new token: each step writes one column in place
    tokens = torch.full((batch, max_new_tokens + 1), pad_id, dtype=torch.long, device=source_ids.device)  # (B, 1 + T)
    tokens[:, 0] = bos_id
    finished = torch.zeros(batch, dtype=torch.bool, device=source_ids.device)
    step_logits = []
    if use_cache:
        state = model.start_decoding(source_ids, max_new_tokens)
    else:
        memory = model.encode(source_ids)
    length = 1  # tokens[:, :length] is the prefix written so far
    for _ in range(max_new_tokens):
        if use_cache:
            logits = model.decode_step(tokens[:, length - 1 : length], state)  # (B, vocab): one new position
        else:
            hidden = model.decode_hidden(tokens[:, :length], memory, source_ids)  # (B, t, d_model): all of it again
            logits = model.logits(hidden[:, -1])  # (B, vocab): only the last position is needed
        step_logits.append(logits)
        next_token = logits.argmax(dim=-1).masked_fill(finished, pad_id)  # (B,)
        tokens[:, length] = next_token
        length += 1
        finished |= next_token == eos_id
        if stop_at_eos and bool(finished.all()):
            break
    generated = tokens[:, 1:length]  # (B, T)
    return (generated, torch.stack(step_logits, dim=1)) if return_logits else generated


@torch.inference_mode()
def beam_search(
    model: Transformer,
    source_ids: torch.Tensor,
    bos_id: int,
    eos_id: int,
    max_new_tokens: int,
    beam_size: int = 4,
    length_penalty: float = 0.6,
) -> torch.Tensor:
    """Keep the beam_size best prefixes by summed log-probability; return the best finished one per sentence (B, T).

    A finished hypothesis stays in the beam and can only be extended by padding at no cost. At the end the
    hypotheses are ranked by score / ((5 + length) / 6) ** length_penalty (Wu et al., 2016), so longer
    translations are not punished just for having more log-probabilities to add up.
    """
    pad_id = model.config.pad_id
    batch, device = source_ids.size(0), source_ids.device
    max_new_tokens = min(max_new_tokens, model.config.max_len - 1)
    # every source row copied beam_size times; the caches have room for max_new_tokens positions
    state = model.start_decoding(source_ids.repeat_interleave(beam_size, dim=0), max_new_tokens)
    scores = torch.zeros(batch, beam_size, device=device)  # (B, K) summed log-probabilities
    scores[:, 1:] = float("-inf")  # all beams start identical: keep only the first so the top-k are distinct
    tokens = torch.full((batch * beam_size, 1), bos_id, dtype=torch.long, device=device)  # (B*K, 1)
    finished = torch.zeros(batch * beam_size, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch * beam_size, device=device)  # tokens generated, EOS included
    batch_offset = torch.arange(batch, device=device)[:, None] * beam_size  # (B, 1)
    for _ in range(max_new_tokens):
        log_probs = model.decode_step(tokens[:, -1:], state).log_softmax(dim=-1)  # (B*K, V)
        vocab = log_probs.size(-1)
        # a finished hypothesis may only continue with padding, at zero cost, so its score is frozen
        log_probs[finished] = float("-inf")
        log_probs[finished, pad_id] = 0.0
        candidates = (scores.view(-1, 1) + log_probs).view(batch, beam_size * vocab)  # (B, K*V)
        scores, best_index = candidates.topk(beam_size, dim=-1)  # (B, K)
        origin = (batch_offset + best_index // vocab).view(-1)  # (B*K,) which old beam each survivor extends
        new_token = (best_index % vocab).view(-1)  # (B*K,)
        reorder_state(state, origin)  # the survivors take over their parents' self-attention caches
        tokens = torch.cat([tokens[origin], new_token[:, None]], dim=1)
        was_finished = finished[origin]
        lengths = lengths[origin] + (~was_finished).float()
        finished = was_finished | (new_token == eos_id)
        if bool(finished.all()):
            break
    normalised = scores / (((5.0 + lengths.view(batch, beam_size)) / 6.0) ** length_penalty)  # (B, K)
    best_beam = normalised.argmax(dim=-1)  # (B,)
    return tokens.view(batch, beam_size, -1)[torch.arange(batch, device=device), best_beam, 1:]


def strip_special(ids: list[int], eos_id: int, pad_id: int) -> list[int]:
    """Cut a generated id list at EOS and drop padding."""
    if eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return [i for i in ids if i != pad_id]


@torch.inference_mode()
def translate(model, processor, sentences, beam_size=1, length_penalty=0.6, batch_size=64, device="cpu", extra=50):
    """English sentences -> Spanish strings, with greedy (beam_size 1) or beam search; batches sorted by length."""
    model.eval()
    pad_id, bos_id, eos_id = model.config.pad_id, processor.bos_id(), processor.eos_id()
    encoded = [ids[: model.config.max_len - 1] + [eos_id] for ids in processor.encode(list(sentences))]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        longest = max(len(encoded[i]) for i in chunk)
        source = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
        for row, i in enumerate(chunk):
            source[row, : len(encoded[i])] = torch.tensor(encoded[i])
        source = source.to(device)
        budget = int(longest * 1.5) + extra  # a translation is rarely much longer than its source
        if beam_size == 1:
            generated = greedy_decode(model, source, bos_id, eos_id, budget)
        else:
            generated = beam_search(model, source, bos_id, eos_id, budget, beam_size, length_penalty)
        for row, i in enumerate(chunk):
            outputs[i] = processor.decode(strip_special(generated[row].tolist(), eos_id, pad_id))
    return outputs
