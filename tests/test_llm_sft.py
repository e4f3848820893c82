"""SFT: the mask covers exactly the answers, user tokens never move a gradient, runs resume exactly."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data import fetch
from llm.conversations import (
    LengthBuckets,
    add_chat_pieces,
    collate,
    encode_examples,
    grow_vocabulary,
    render_with_mask,
    sentencepiece_chat_tokenizer,
)
from llm.instructions import Example
from llm.lora import add_lora
from llm.model import Llama, LlamaConfig
from llm.sft import AnswerLoss, parse_mix

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
CONVERSATION = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "Translate to Spanish: I am hungry."},
    {"role": "assistant", "content": "Tengo hambre."},
    {"role": "user", "content": "And: the cat sleeps."},
    {"role": "assistant", "content": "El gato duerme."},
]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from llm.gguf_file import GGUFTokenizer, open_gguf

    path = fetch("smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return GGUFTokenizer(open_gguf(path), str(path))


@pytest.fixture(scope="module")
def sentencepiece_bytes() -> bytes:
    """A 400-piece SentencePiece BPE trained on real WikiText-2 text, as llm/prepare.py trains one."""
    import sentencepiece as spm

    text = (fetch("wikitext-2") / "valid.raw").read_text(encoding="utf-8")[:60_000]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_writer=model, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, user_defined_symbols=["\n"],
                                   normalization_rule_name="identity", character_coverage=0.99, unk_id=0, eos_id=1,
                                   bos_id=-1, pad_id=-1, minloglevel=2, num_threads=1)
    return model.getvalue()


def expected_mask(tokenizer, messages) -> list[bool]:
    """The mask built independently: encode the whole rendered text, give every token its character span by
    decoding prefixes, and mark the tokens inside an answer's content or its closing <|im_end|>."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans, position = [], 0
    for message in messages:
        if message["role"] == "assistant":
            start = text.index(message["content"], position)
            end = start + len(message["content"]) + len("<|im_end|>")
            assert text[end - len("<|im_end|>"): end] == "<|im_end|>"
            spans.append((start, end))
            position = end
    ids = tokenizer.encode(text)
    pieces = [tokenizer_piece(tokenizer, token) for token in ids]
    mask, offset = [], 0
    for piece in pieces:
        mask.append(any(start <= offset and offset + len(piece) <= end for start, end in spans))
        offset += len(piece)
    assert offset == len(text)
    return ids, mask


def tokenizer_piece(tokenizer, token: int) -> str:
    """The text of one token, special tokens included."""
    if hasattr(tokenizer, "processor"):
        piece = tokenizer.processor.id_to_piece(token)
        if tokenizer.processor.is_byte(token):  # <0x21> stands for one byte (ASCII text here: one character)
            return chr(int(piece[3:5], 16))
        return piece.replace("\u2581", " ")
    return tokenizer.tokenizer.decode([token], skip_special_tokens=False)


@pytest.mark.slow
def test_mask_covers_exactly_the_answers_and_their_end_token_with_smollm2s_template(smollm2_tokenizer):
    ids, mask = render_with_mask(smollm2_tokenizer, CONVERSATION)
    expected_ids, expected = expected_mask(smollm2_tokenizer, CONVERSATION)
    assert ids == expected_ids  # piece-by-piece encoding gives the ids of the whole text
    assert mask == expected
    answers = [smollm2_tokenizer.encode(m["content"]) + [2] for m in CONVERSATION if m["role"] == "assistant"]
    assert [token for token, keep in zip(ids, mask) if keep] == answers[0] + answers[1]
    assert smollm2_tokenizer.decode([t for t, keep in zip(ids, mask) if keep]) == "Tengo hambre.El gato duerme."


def test_mask_covers_exactly_the_answers_with_a_grown_sentencepiece_vocabulary(sentencepiece_bytes):
    tokenizer = sentencepiece_chat_tokenizer(sentencepiece_bytes)
    assert tokenizer.vocab_size == 402 and tokenizer.processor.piece_to_id("<|im_end|>") == 401
    assert tokenizer.encode("a<|im_start|>b") == tokenizer.encode("a") + [400] + tokenizer.encode("b")
    ids, mask = render_with_mask(tokenizer, CONVERSATION)
    expected_ids, expected = expected_mask(tokenizer, CONVERSATION)
    assert ids == expected_ids and mask == expected
    assert sum(mask) == len(tokenizer.encode("Tengo hambre.")) + len(tokenizer.encode("El gato duerme.")) + 2
    assert 401 in tokenizer.stop_ids


def test_add_chat_pieces_keeps_every_old_piece_and_is_idempotent(sentencepiece_bytes):
    import sentencepiece as spm

    old = spm.SentencePieceProcessor(model_proto=sentencepiece_bytes)
    grown_bytes = add_chat_pieces(sentencepiece_bytes)
    grown = spm.SentencePieceProcessor(model_proto=grown_bytes)
    assert [grown.id_to_piece(i) for i in range(400)] == [old.id_to_piece(i) for i in range(400)]
    assert add_chat_pieces(grown_bytes) == grown_bytes


def tiny_model(vocab_size=402, seed=0, **overrides) -> Llama:
    torch.manual_seed(seed)
    settings = dict(vocab_size=vocab_size, context_length=96, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32)
    return Llama(LlamaConfig(**{**settings, **overrides}))


def conversation_batch(tokenizer):
    other = [CONVERSATION[1], {"role": "assistant", "content": "Tengo mucha hambre."}]
    encoded = encode_examples(tokenizer, [Example("t", CONVERSATION), Example("t", other)], 96)
    return encoded, collate(encoded, [0, 1], pad_id=tokenizer.eos_id())


def test_changing_a_user_tokens_target_changes_no_gradient(sentencepiece_bytes):
    tokenizer = sentencepiece_chat_tokenizer(sentencepiece_bytes)
    _, (inputs, targets, mask) = conversation_batch(tokenizer)
    model = add_lora(tiny_model(), rank=4)
    with torch.no_grad():  # B = 0 would give A no gradient at all: start from a trained-looking adapter
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(0, 0.05)
    loss_module = AnswerLoss(model)

    def gradients(new_targets):
        model.zero_grad()
        loss_module(inputs, new_targets, mask).backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    reference = gradients(targets)
    user_position = int((~mask[0]).nonzero()[5])  # a position inside the system/user text
    changed = targets.clone()
    changed[0, user_position] = (changed[0, user_position] + 7) % 400
    assert all(torch.equal(a, b) for a, b in zip(reference, gradients(changed)))
    answer_position = int(mask[0].nonzero()[0])
    changed = targets.clone()
    changed[0, answer_position] = (changed[0, answer_position] + 7) % 400
    assert not all(torch.equal(a, b) for a, b in zip(reference, gradients(changed)))


def test_answer_loss_equals_the_masked_cross_entropy_of_the_full_logits(sentencepiece_bytes):
    tokenizer = sentencepiece_chat_tokenizer(sentencepiece_bytes)
    _, (inputs, targets, mask) = conversation_batch(tokenizer)
    model = tiny_model()
    logits, _ = model(inputs)  # (B, T, V)
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T)
    torch.testing.assert_close(AnswerLoss(model)(inputs, targets, mask), (per_token * mask).sum())


def test_collate_pads_after_the_tokens_and_masks_the_padding(sentencepiece_bytes):
    tokenizer = sentencepiece_chat_tokenizer(sentencepiece_bytes)
    encoded, (inputs, targets, mask) = conversation_batch(tokenizer)
    short = len(encoded[1][0]) - 1
    assert inputs.shape == (2, len(encoded[0][0]) - 1)
    assert inputs[1, :short].tolist() == encoded[1][0][:-1] and targets[1, :short].tolist() == encoded[1][0][1:]
    assert not mask[1, short:].any() and (inputs[1, short:] == tokenizer.eos_id()).all()
    assert mask[0].tolist() == encoded[0][1][1:]


def test_padding_to_a_multiple_changes_neither_the_loss_nor_the_gradients(sentencepiece_bytes):
    tokenizer = sentencepiece_chat_tokenizer(sentencepiece_bytes)
    encoded, (inputs, targets, mask) = conversation_batch(tokenizer)
    padded = collate(encoded, [0, 1], pad_id=tokenizer.eos_id(), multiple=16)
    assert padded[0].size(1) % 16 == 0 and padded[0].size(1) - inputs.size(1) < 16
    assert torch.equal(padded[0][:, : inputs.size(1)], inputs) and not padded[2][:, inputs.size(1):].any()
    model = add_lora(tiny_model(), rank=4)
    loss_module = AnswerLoss(model)

    def loss_and_gradients(batch):
        model.zero_grad()
        loss = loss_module(*batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    loss, gradients = loss_and_gradients((inputs, targets, mask))
    padded_loss, padded_gradients = loss_and_gradients(padded)
    torch.testing.assert_close(padded_loss, loss)
    for gradient, padded_gradient in zip(gradients, padded_gradients):
        torch.testing.assert_close(padded_gradient, gradient)


def test_length_buckets_are_a_pure_function_of_the_step_and_pad_little():
    lengths = [int(x) for x in torch.randint(10, 200, (400,), generator=torch.Generator().manual_seed(0))]
    buckets, again = LengthBuckets(lengths, 8, seed=3), LengthBuckets(lengths, 8, seed=3)
    assert [again.batch(step) for step in (7, 120, 3)] == [buckets.batch(step) for step in (7, 120, 3)]
    epoch = [i for step in range(buckets.batches_per_epoch) for i in buckets.batch(step)]
    assert len(epoch) == len(set(epoch)) == 400  # every example once per epoch
    padded = sum(max(lengths[i] for i in buckets.batch(s)) * 8 for s in range(50))
    real = sum(lengths[i] for s in range(50) for i in buckets.batch(s))
    assert padded < 1.05 * real
    assert buckets.batch(0) != buckets.batch(buckets.batches_per_epoch)  # a new order each epoch


def test_grown_rows_start_at_the_mean_and_leave_the_old_logits_unchanged():
    model = tiny_model(vocab_size=400, tie_embeddings=False)
    tokens = torch.randint(0, 400, (2, 10))
    before, _ = model(tokens)
    assert grow_vocabulary(model, 402) == 2
    after, _ = model(tokens)
    torch.testing.assert_close(after[..., :400], before)
    torch.testing.assert_close(model.embedding.weight[400], model.embedding.weight[:400].mean(dim=0))
    torch.testing.assert_close(model.output_proj.weight[401], model.output_proj.weight[:400].mean(dim=0))
    mean_logit = before.mean(dim=-1)  # h . mean(W) = mean(h . W): a new token gets the mean of the old logits
    torch.testing.assert_close(after[..., 400], mean_logit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after[..., 401], mean_logit, atol=1e-5, rtol=1e-5)
    assert model.config.vocab_size == 402 and model.embedding.num_embeddings == 402


def test_mix_flag_parses_and_refuses_unknown_tasks():
    assert parse_mix("translation=10, surnames=0") == {"translation": 10, "surnames": 0}
    with pytest.raises(ValueError, match="--mix"):
        parse_mix("poetry=3")
    with pytest.raises(ValueError, match="--mix"):
        parse_mix("translation=many")


# ---------------------------------------------------------------- the script, on a model pretrained here

TINY_PRETRAIN = ["--d-model", "32", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2", "--context-length", "96",
                 "--batch-size", "4", "--vocab-size", "400", "--num-samples", "0", "--lr", "3e-3", "--warmup-steps",
                 "2", "--eval-batches", "2", "--dtype", "float32", "--max-steps", "4", "--eval-every", "4",
                 "--no-final-eval", "--compile", "off"]
TINY_SFT = ["--full", "--mix", "surnames=48,translation=16", "--eval-examples", "4", "--batch-size", "4",
            "--max-steps", "6", "--eval-every", "3", "--warmup-steps", "2", "--lr", "1e-3", "--dtype", "float32",
            "--device", "cpu"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny model trained a few steps by llm/train.py on real WikiText-2 text."""
    from llm.train import main

    folder = tmp_path_factory.mktemp("sft")
    text_file = folder / "wiki.txt"
    text_file.write_text((fetch("wikitext-2") / "valid.raw").read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    main([*TINY_PRETRAIN, "--text-file", str(text_file), "--data-dir", str(folder / "data"),
          "--out-dir", str(folder / "base")])
    return folder / "base" / "best.pt"


def sft(*arguments: str):
    from llm.sft import main

    main(list(arguments))


def losses(out_dir: Path) -> dict:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train_loss"] for row in rows}


def test_a_model_pretrained_here_learns_the_chat_format_and_loads_for_chat(pretrained, tmp_path, capsys):
    from llm.chat_model import load_chat_model

    sft(*TINY_SFT, "--checkpoint", str(pretrained), "--out-dir", str(tmp_path / "run"))
    output = capsys.readouterr().out
    assert "gains the chat tokens" in output and "wrote" in output
    model, tokenizer = load_chat_model(checkpoint=str(tmp_path / "run" / "model.pt"))
    assert model.config.vocab_size == 402 and tokenizer.processor.piece_to_id("<|im_end|>") == 401
    assert 401 in tokenizer.stop_ids
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    trained = losses(tmp_path / "run")
    assert set(trained) == set(range(1, 7)) and trained[6] < trained[1]
    for name in ("best.pt", "last.pt", "loss.png", "model.pt", "tokenizer.model"):
        assert (tmp_path / "run" / name).is_file()


def test_interrupted_then_resumed_run_equals_the_uninterrupted_one(pretrained, tmp_path, capsys):
    sft(*TINY_SFT, "--checkpoint", str(pretrained), "--out-dir", str(tmp_path / "straight"))
    sft(*TINY_SFT, "--checkpoint", str(pretrained), "--out-dir", str(tmp_path / "stopped"), "--stop-at-step", "4")
    assert "resume with: python llm/sft.py" in capsys.readouterr().out
    assert not (tmp_path / "stopped" / "model.pt").exists()
    sft(*TINY_SFT, "--checkpoint", str(pretrained), "--out-dir", str(tmp_path / "stopped"), "--resume")
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")
    straight = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "stopped" / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


@pytest.mark.slow
def test_lora_on_a_grown_vocabulary_and_bad_input_end_in_one_line(pretrained, tmp_path, run_cli):
    base = ["--checkpoint", str(pretrained), "--mix", "surnames=8", "--max-steps", "1", "--device", "cpu"]
    cases = [
        ([*base, "--out-dir", str(tmp_path / "a")], "pass --full"),
        ([*base, "--full", "--mix", "poetry=3", "--out-dir", str(tmp_path / "b")], "--mix takes"),
        ([*base, "--full", "--lora-targets", "q,x", "--out-dir", str(tmp_path / "c")], None),
        (["--checkpoint", str(tmp_path / "missing.pt"), "--out-dir", str(tmp_path / "d")], "does not exist"),
        ([*base, "--full", "--out-dir", str(tmp_path / "e"), "--resume"], "--resume"),
        ([*base, "--lr", "-1"], "--lr"),
    ]
    for arguments, message in cases:
        result = run_cli("llm/sft.py", *arguments, env=ONE_THREAD)
        assert result.returncode != 0, arguments
        lines = result.stderr.strip().splitlines()
        assert "Traceback" not in result.stderr and lines, arguments
        if message:
            assert message in lines[-1], (arguments, lines[-1])


def test_a_finished_run_is_never_overwritten_without_asking(pretrained, tmp_path, capsys):
    out = tmp_path / "run"
    sft(*TINY_SFT, "--checkpoint", str(pretrained), "--out-dir", str(out), "--max-steps", "3")
    before = (out / "model.pt").read_bytes()
    with pytest.raises(SystemExit, match="already holds a run"):
        sft(*TINY_SFT, "--checkpoint", str(pretrained), "--out-dir", str(out), "--max-steps", "3")
    assert (out / "model.pt").read_bytes() == before


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_at_the_same_global_batch(pretrained, tmp_path):
    common = [*TINY_SFT, "--checkpoint", str(pretrained)]
    sft(*common, "--out-dir", str(tmp_path / "single"))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531", "llm/sft.py",
         *common, "--batch-size", "2", "--grad-accum", "1", "--out-dir", str(tmp_path / "ddp")],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **ONE_THREAD},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    single, distributed = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert single.keys() == distributed.keys() == set(range(1, 7))
    for step in single:
        assert distributed[step] == pytest.approx(single[step], abs=1e-5)


@pytest.mark.slow
def test_a_smollm2_lora_fine_tune_merged_into_model_pt_computes_base_plus_adapters_and_exports(tmp_path, run_cli):
    """A few LoRA steps on the real SmolLM2 (its base trained in bf16), then model.pt and the HF export reloaded.

    The merged float32 model and the float32 base with the adapters differ only in the order of float32 operations
    ((W + s B A) x against W x + s B (A x)): about 2e-4 in a logit after 30 blocks, so atol 1e-3. Merging into bf16
    weights, as model.pt once was, moved logits by 0.85; the fine-tune itself moves them by more than 0.1.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm.chat_model import load_chat_model
    from llm.lora import load_adapters

    out = tmp_path / "smol"
    result = run_cli("llm/sft.py", "--mix", "surnames=16,translation=16", "--eval-examples", "2", "--batch-size", "4",
                     "--max-steps", "3", "--warmup-steps", "0", "--eval-every", "3", "--out-dir", str(out),
                     env=ONE_THREAD, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "adapters.pt").stat().st_size < 15e6
    merged, tokenizer = load_chat_model(checkpoint=str(out / "model.pt"))
    base, _ = load_chat_model()
    ids = torch.tensor([tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": "Which language does the surname Nakamura come from? Answer with one word."}]))])
    with torch.no_grad():
        base_logits = base(ids)[0]  # (1, T, V)
        load_adapters(out / "adapters.pt", base)
        adapted_logits, merged_logits = base(ids)[0], merged(ids)[0]
    assert (adapted_logits - base_logits).abs().max() > 0.1  # the adapters really changed the model
    torch.testing.assert_close(merged_logits, adapted_logits, atol=1e-3, rtol=0)
    exported = run_cli("llm/export.py", "--checkpoint", str(out / "model.pt"), "--out", str(tmp_path / "hf"),
                       env=ONE_THREAD, timeout=600)
    assert exported.returncode == 0, exported.stderr[-2000:]
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    their_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = their_tokenizer.apply_chat_template([{"role": "user", "content": "Which language does the surname "
                                                 "Nakamura come from? Answer with one word."}], tokenize=False,
                                               add_generation_prompt=True)
    assert their_tokenizer(text, add_special_tokens=False).input_ids == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, merged_logits, atol=1e-3, rtol=0)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(pretrained, tmp_path, monkeypatch):
    import llm.sft

    real_step = llm.sft.train_step

    def poisoned(run, step):
        loss, grad_norm, tokens = real_step(run, step)
        return (float("nan") if step == 4 else loss), grad_norm, tokens

    monkeypatch.setattr(llm.sft, "train_step", poisoned)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="not finite at step 5"):
        sft(*TINY_SFT, "--checkpoint", str(pretrained), "--out-dir", str(out), "--eval-every", "2")
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 4
    assert not (out / "model.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_saves_exits_130_and_the_resumed_run_finishes(pretrained, tmp_path, signal_name):
    import signal
    import time

    out = tmp_path / "run"
    command = [sys.executable, "llm/sft.py", *TINY_SFT, "--checkpoint", str(pretrained), "--out-dir", str(out),
               "--max-steps", "400", "--eval-every", "1000"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **ONE_THREAD})
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and
                                          (out / "metrics.jsonl").read_text().count("\n") >= 3):
        time.sleep(0.2)
    process.send_signal(getattr(signal, signal_name))
    stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 130 and "resume with: python llm/sft.py" in stdout
    stopped_at = torch.load(out / "last.pt", weights_only=True)["step"]
    assert 3 <= stopped_at < 400
    assert len((out / "metrics.jsonl").read_text().splitlines()) == stopped_at
    resumed = subprocess.run([*command, "--resume", "--max-steps", "400"], cwd=REPO, capture_output=True, text=True,
                             env={**os.environ, **ONE_THREAD}, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (out / "model.pt").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) == 400
