"""Tests of the Transformer chapter: the hand-written parts against torch, masks, caching, beams, training, CLI."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from transformer.decoding import beam_search, greedy_decode
from transformer.eval import main as eval_main
from transformer.model import (
    LayerNorm,
    Transformer,
    TransformerConfig,
    reorder_state,
    scaled_dot_product_attention,
)
from transformer.prepare import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    collate,
    encode_pairs,
    load_pairs,
    load_tokenizer,
    split_pairs,
    token_batches,
    train_tokenizer,
)
from transformer.train import WeightAverage, label_smoothed_cross_entropy
from transformer.train import main as train_main

TINY = dict(vocab_size=50, d_model=32, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, d_ff=64, dropout=0.0)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster than two that fight


def tiny_model(**overrides) -> Transformer:
    """A small random model in float64, so comparisons can be tight."""
    return Transformer(TransformerConfig(**{**TINY, **overrides})).double()


def random_batch(batch=3, source_length=7, target_length=5, vocab=50):
    """Random token ids with some right padding in both source and target."""
    source = torch.randint(4, vocab, (batch, source_length))
    target = torch.randint(4, vocab, (batch, target_length))
    source[0, -3:] = PAD_ID
    target[1, -2:] = PAD_ID
    return source, target


@pytest.fixture(scope="module")
def pairs():
    """The real Tatoeba pairs, split by English sentence."""
    return split_pairs(load_pairs())


def test_layernorm_matches_torch_forward_and_gradients():
    x = torch.randn(4, 6, 16, dtype=torch.float64, requires_grad=True)
    ours, reference = LayerNorm(16).double(), nn.LayerNorm(16).double()
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
        reference.weight.copy_(ours.weight)
        reference.bias.copy_(ours.bias)
    grad = torch.randn(4, 6, 16, dtype=torch.float64)
    (ours_out,) = torch.autograd.grad(ours(x), x, grad)
    (reference_out,) = torch.autograd.grad(reference(x), x, grad)
    torch.testing.assert_close(ours(x), reference(x))
    torch.testing.assert_close(ours_out, reference_out)


def test_handwritten_attention_matches_fused_with_masks():
    query, key, value = (torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    allowed = torch.ones(5, 5, dtype=torch.bool).tril() & torch.tensor([1, 1, 1, 1, 0], dtype=torch.bool)
    ours, _ = scaled_dot_product_attention(query, key, value, allowed)
    fused = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed)
    torch.testing.assert_close(ours, fused)
    grad = torch.randn_like(ours)
    torch.testing.assert_close(
        torch.autograd.grad(ours, (query, key, value), grad), torch.autograd.grad(fused, (query, key, value), grad)
    )


def test_handwritten_model_matches_fused_model_outputs_and_gradients():
    source, target = random_batch()
    handwritten = tiny_model()
    fused = tiny_model(attention="fused")
    fused.load_state_dict(handwritten.state_dict())
    out_handwritten, out_fused = handwritten(source, target), fused(source, target)
    torch.testing.assert_close(out_handwritten, out_fused)
    out_handwritten.pow(2).mean().backward()
    out_fused.pow(2).mean().backward()
    for (name, a), b in zip(handwritten.named_parameters(), fused.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def copy_attention(ours, theirs: nn.MultiheadAttention):
    """Put our q/k/v/out projections into torch's packed in_proj and out_proj."""
    with torch.no_grad():
        theirs.in_proj_weight.copy_(
            torch.cat([ours.query_projection.weight, ours.key_projection.weight, ours.value_projection.weight])
        )
        theirs.in_proj_bias.copy_(
            torch.cat([ours.query_projection.bias, ours.key_projection.bias, ours.value_projection.bias])
        )
        theirs.out_proj.weight.copy_(ours.output_projection.weight)
        theirs.out_proj.bias.copy_(ours.output_projection.bias)


def copy_feed_forward_and_norms(ours, theirs, sublayers):
    """Copy the feed-forward and the LayerNorms (norm1, norm2, norm3 in sublayer order)."""
    with torch.no_grad():
        theirs.linear1.load_state_dict(ours.feed_forward.expand.state_dict())
        theirs.linear2.load_state_dict(ours.feed_forward.contract.state_dict())
        for index, sublayer in enumerate(sublayers, start=1):
            getattr(theirs, f"norm{index}").load_state_dict(sublayer.norm.state_dict())


@pytest.mark.parametrize("norm_first", [False, True])
def test_layers_match_torch_transformer_layers_with_copied_weights(norm_first):
    model = tiny_model(norm_first=norm_first)
    for layer in model.modules():  # random LayerNorm parameters, so that copying them is really tested
        if isinstance(layer, LayerNorm):
            nn.init.normal_(layer.weight)
            nn.init.normal_(layer.bias)
    ours_encoder, ours_decoder = model.encoder_layers[0], model.decoder_layers[0]
    options = dict(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True, norm_first=norm_first)
    torch_encoder = nn.TransformerEncoderLayer(**options).double()
    torch_decoder = nn.TransformerDecoderLayer(**options).double()
    copy_attention(ours_encoder.self_attention, torch_encoder.self_attn)
    copy_feed_forward_and_norms(
        ours_encoder, torch_encoder, [ours_encoder.attention_sublayer, ours_encoder.feed_forward_sublayer]
    )
    copy_attention(ours_decoder.self_attention, torch_decoder.self_attn)
    copy_attention(ours_decoder.cross_attention, torch_decoder.multihead_attn)
    copy_feed_forward_and_norms(
        ours_decoder,
        torch_decoder,
        [ours_decoder.self_sublayer, ours_decoder.cross_sublayer, ours_decoder.feed_forward_sublayer],
    )
    source_ids, target_ids = random_batch()
    source = torch.randn(3, 7, 32, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True)
    # ours: True = may attend; torch: True = masked out
    memory_ours = ours_encoder(source, model.source_mask(source_ids))
    memory_torch = torch_encoder(source, src_key_padding_mask=source_ids == PAD_ID)
    real_source = source_ids != PAD_ID
    torch.testing.assert_close(memory_ours[real_source], memory_torch[real_source])
    torch.testing.assert_close(
        torch.autograd.grad(memory_ours[real_source].sum(), source)[0],
        torch.autograd.grad(memory_torch[real_source].sum(), source)[0],
    )
    memory = memory_ours.detach().requires_grad_(True)
    keys_values = ours_decoder.cross_attention.project_keys_values(memory)
    out_ours = ours_decoder(target, model.target_mask(target_ids), keys_values, model.source_mask(source_ids))
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    out_torch = torch_decoder(
        target, memory, tgt_mask=causal, tgt_key_padding_mask=target_ids == PAD_ID,
        memory_key_padding_mask=source_ids == PAD_ID,
    )
    real_target = target_ids != PAD_ID
    torch.testing.assert_close(out_ours[real_target], out_torch[real_target])
    torch.testing.assert_close(
        torch.autograd.grad(out_ours[real_target].sum(), (target, memory)),
        torch.autograd.grad(out_torch[real_target].sum(), (target, memory)),
    )


def test_padding_changes_nothing():
    model = tiny_model().eval()
    source, target = torch.randint(4, 50, (1, 6)), torch.randint(4, 50, (1, 4))
    alone = model(source, target)
    padded_source = torch.cat([source, torch.zeros(1, 3, dtype=torch.long)], dim=1)  # 3 padding tokens
    padded_target = torch.cat([target, torch.zeros(1, 2, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded_source, padded_target)[:, :4], alone)


def test_future_position_changes_nothing():
    model = tiny_model().eval()
    source, target = torch.randint(4, 50, (2, 6)), torch.randint(4, 50, (2, 5))
    changed = target.clone()
    changed[:, 3] = (changed[:, 3] + 1) % 46 + 4  # change position 3: outputs at 0..2 must not move
    before, after = model(source, target), model(source, changed)
    torch.testing.assert_close(before[:, :3], after[:, :3])
    assert not torch.allclose(before[:, 3:], after[:, 3:])


@pytest.mark.parametrize("norm_first", [False, True])
def test_cached_decoding_gives_same_tokens_and_logits_as_recomputing(norm_first):
    model = tiny_model(norm_first=norm_first).eval()
    source, _ = random_batch()
    cached, cached_logits = greedy_decode(model, source, BOS_ID, EOS_ID, 12, use_cache=True, return_logits=True)
    full, full_logits = greedy_decode(model, source, BOS_ID, EOS_ID, 12, use_cache=False, return_logits=True)
    assert torch.equal(cached, full)
    unfinished = torch.cat([torch.ones(3, 1, dtype=torch.bool), (cached != EOS_ID).cumprod(1)[:, :-1].bool()], 1)
    torch.testing.assert_close(cached_logits[unfinished], full_logits[unfinished])


def test_kv_cache_is_written_in_place_and_read_as_views():
    model = tiny_model().eval()
    source, _ = random_batch()
    state = model.start_decoding(source, max_new_tokens=6)
    cache = state["self_caches"][0]
    storage = cache.keys.data_ptr()
    with torch.inference_mode():
        for token in [BOS_ID, 7, 9]:
            model.decode_step(torch.full((3, 1), token), state)
        keys, values = cache.append(torch.zeros(3, 4, 1, 8, dtype=torch.float64), torch.ones(3, 4, 1, 8).double())
    assert cache.keys.data_ptr() == storage and keys.data_ptr() == storage  # no step allocated a new cache
    assert keys.shape == (3, 4, 4, 8) and cache.length == 4 and torch.equal(values[:, :, 3], torch.ones(3, 4, 8))
    with pytest.raises(ValueError, match="does not fit"):
        cache.append(*(torch.zeros(3, 4, 3, 8, dtype=torch.float64),) * 2)


def test_reordered_cache_continues_as_if_the_chosen_prefixes_were_recomputed():
    model = tiny_model().eval()
    source, _ = random_batch(batch=2)
    source = source.repeat_interleave(3, dim=0)  # 2 sentences x 3 beams, as beam search lays them out
    prefix = torch.cat([torch.full((6, 1), BOS_ID), torch.randint(4, 50, (6, 3))], dim=1)  # (6, 4)
    state = model.start_decoding(source, max_new_tokens=8)
    with torch.inference_mode():
        for position in range(4):
            model.decode_step(prefix[:, position : position + 1], state)
        origin = torch.tensor([2, 2, 0, 4, 3, 3])  # each survivor continues a beam of its own sentence
        reorder_state(state, origin)
        next_token = torch.randint(4, 50, (6, 1))
        cached = model.decode_step(next_token, state)  # (6, vocab)
        reordered = torch.cat([prefix[origin], next_token], dim=1)  # (6, 5)
        recomputed = model.decode(reordered, model.encode(source), source)[:, -1]  # (6, vocab)
    torch.testing.assert_close(cached, recomputed)


def test_beam_size_one_equals_greedy():
    model = tiny_model().eval()
    source, _ = random_batch()
    greedy = greedy_decode(model, source, BOS_ID, EOS_ID, 10)
    beam = beam_search(model, source, BOS_ID, EOS_ID, 10, beam_size=1)
    assert torch.equal(greedy, beam)


def test_beam_search_scores_at_least_as_high_as_greedy_on_a_random_model():
    model = tiny_model().eval()
    source, _ = random_batch()

    def log_probability(tokens):
        target_in = torch.cat([torch.full((3, 1), BOS_ID), tokens[:, :-1]], dim=1)
        log_probs = model(source, target_in).log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
        return (log_probs * (tokens != PAD_ID)).sum(1)

    greedy = greedy_decode(model, source, BOS_ID, EOS_ID, 8, stop_at_eos=False)
    beam = beam_search(model, source, BOS_ID, EOS_ID, 8, beam_size=4, length_penalty=0.0)
    width = max(greedy.size(1), beam.size(1))
    greedy, beam = (F.pad(t, (0, width - t.size(1)), value=PAD_ID) for t in (greedy, beam))
    assert (log_probability(beam) >= log_probability(greedy) - 1e-9).all()


def test_label_smoothing_matches_torch_cross_entropy():
    logits, target = torch.randn(10, 30, dtype=torch.float64), torch.randint(0, 30, (10,))
    target[2] = PAD_ID
    expected = F.cross_entropy(logits, target, label_smoothing=0.1, ignore_index=PAD_ID)
    torch.testing.assert_close(label_smoothed_cross_entropy(logits, target, 0.1), expected)


def test_split_by_english_sentence_is_disjoint(pairs):
    english = {name: {source for source, _ in split} for name, split in pairs.items()}
    assert not english["train"] & english["valid"] and not english["train"] & english["test"]
    assert not english["valid"] & english["test"]
    assert sum(len(split) for split in pairs.values()) == 140868
    assert split_pairs(load_pairs())["test"][:50] == pairs["test"][:50]  # reproducible


def test_token_batches_respect_the_budget_and_cover_every_pair():
    encoded = [([5] * (i % 13 + 1), [6] * (i % 7 + 2)) for i in range(300)]
    batches = token_batches(encoded, 60, torch.Generator().manual_seed(0))
    assert sorted(i for batch in batches for i in batch) == list(range(300))
    for batch in batches:
        assert len(batch) * max(max(len(encoded[i][0]), len(encoded[i][1])) for i in batch) <= 60


def test_tiny_model_loss_falls_on_real_pairs(pairs):
    train = pairs["train"][20000:20300]
    processor = load_tokenizer(train_tokenizer(train, 300))
    encoded = encode_pairs(processor, train, 64)
    model = Transformer(TransformerConfig(**{**TINY, "vocab_size": processor.get_piece_size()}))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-9)
    batches = token_batches(encoded, 800, torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        for indices in batches:
            source, decoder_input, decoder_target = collate(encoded, indices)
            logits = model(source, decoder_input)
            loss = label_smoothed_cross_entropy(logits.flatten(0, 1), decoder_target.flatten(), 0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3


TINY_FLAGS = ["--d-model", "32", "--num-heads", "2", "--d-ff", "64", "--vocab-size", "300", "--train-fraction",
              "0.005", "--valid-pairs", "50", "--valid-bleu-sentences", "10", "--no-progress", "--threads", "1"]


@pytest.mark.slow
def test_checkpoint_round_trip_resume_and_eval(run_cli, tmp_path, capsys):
    out = str(tmp_path / "run")
    train_main([*TINY_FLAGS, "--out-dir", out, "--max-steps", "3", "--valid-every", "2"])
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert checkpoint["step"] == 3 and len(checkpoint["records"]) == 2
    train_main([*TINY_FLAGS, "--out-dir", out, "--max-steps", "5", "--resume"])
    after = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert after["step"] == 5 and after["batch_in_epoch"] == 5
    assert not torch.equal(after["model"]["embedding.weight"], checkpoint["model"]["embedding.weight"])
    capsys.readouterr()
    eval_main(["--checkpoint", out + "/last.pt", "--limit", "12", "--json", "--beam-size", "2", "--device", "cpu"])
    metrics = json.loads(capsys.readouterr().out)
    assert {"bleu", "chrf", "beam_size", "greedy_bleu"} <= metrics.keys() and metrics["beam_size"] == 2
    # a checkpoint of another config: resuming with other flags refuses and keeps the good checkpoint
    other = run_cli("transformer/train.py", *TINY_FLAGS, "--out-dir", out, "--max-steps", "6", "--resume",
                    "--d-model", "64")
    assert other.returncode != 0 and other.stderr.strip().startswith("error:") and "Traceback" not in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 5


def test_weight_average_follows_the_weights_at_its_decay():
    model = nn.Linear(2, 2)
    average = WeightAverage(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update(model)  # warm-up decay min(0.9, 2/11): the average moves 9/11 of the way
    assert torch.allclose(average.weights["weight"], start + 9 / 11)
    for _ in range(200):
        average.update(model)
    assert torch.allclose(average.weights["weight"], model.weight, atol=1e-6)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(5.0)  # the average now lags far behind
    raw = average.swapped_into(model)
    assert torch.equal(raw["weight"], before + 5.0) and torch.equal(model.weight, average.weights["weight"])


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run_weights_and_average(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train_main([*TINY_FLAGS, "--out-dir", straight, "--max-steps", "4", "--valid-every", "2"])
    train_main([*TINY_FLAGS, "--out-dir", resumed, "--max-steps", "2", "--valid-every", "2"])
    train_main([*TINY_FLAGS, "--out-dir", resumed, "--max-steps", "4", "--valid-every", "2", "--resume"])
    one, two = (torch.load(f"{path}/last.pt", weights_only=True) for path in (straight, resumed))
    for key in ("model", "raw_model"):  # the averaged weights and the training weights
        for name, tensor in one[key].items():
            assert torch.allclose(tensor, two[key][name], atol=1e-6), (key, name)
    assert not torch.equal(one["model"]["embedding.weight"], one["raw_model"]["embedding.weight"])


@pytest.mark.slow
def test_missing_checkpoint_gives_one_clear_error(run_cli):
    result = run_cli("transformer/eval.py", "--checkpoint", "missing.pt", timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: checkpoint missing.pt does not exist"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--translate", "", "--checkpoint", "missing.pt"], "error: --translate needs some English text"),
        (["--checkpoint", "FOREIGN", "--translate", "Hello."], "is not a readable transformer checkpoint"),
        (["--checkpoint", "MISMATCHED", "--translate", "Hello."], "error: checkpoint does not match this model"),
        (["--checkpoint", "CORRUPT", "--translate", "Hello."], "is not a readable transformer checkpoint"),
    ],
)
def test_eval_bad_input_gives_one_clear_error(tmp_path, capsys, arguments, message):
    torch.save({"config": {"hidden": 3}, "model": {"weight": torch.zeros(2)}}, tmp_path / "foreign.pt")
    model = tiny_model()
    state = {name: tensor.float() for name, tensor in model.state_dict().items()}
    state["embedding.weight"] = torch.zeros(7, 7)
    torch.save({"kind": "transformer-translation", "config": model.config.to_dict(), "model": state,
                "tokenizer": torch.zeros(1, dtype=torch.uint8), "split": {}, "step": 0}, tmp_path / "mismatched.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    names = {"FOREIGN": "foreign.pt", "MISMATCHED": "mismatched.pt", "CORRUPT": "corrupt.pt"}
    arguments = [str(tmp_path / names[a]) if a in names else a for a in arguments]
    with pytest.raises(SystemExit) as exit_info:
        eval_main(arguments)
    assert exit_info.value.code != 0
    error_line = str(exit_info.value.code)
    assert error_line.startswith("error:") and message in error_line and "\n" not in error_line
