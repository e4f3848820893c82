"""DPO by hand: the loss equals its formula (value and gradients), starts at log 2, and moves the right way."""

import math

import pytest
import torch

from llm.dpo import answer_log_probs, dpo_loss
from llm.lora import adapters_disabled, add_lora
from llm.model import Llama, LlamaConfig

torch.set_num_threads(1)


def tiny_model(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(vocab_size=41, context_length=16, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32))


def pair_batch(seed: int = 3):
    """Two sequences per pair sharing a prompt of 5 tokens; answers of 4 and 6 tokens (mask marks them)."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, 41, (4, 12), generator=generator)  # rows 0,1: chosen; rows 2,3: rejected
    rows[2:, :5] = rows[:2, :5]  # the same prompts
    inputs, targets = rows[:, :-1], rows[:, 1:]
    mask = torch.zeros_like(targets, dtype=torch.bool)
    mask[0, 4:8] = mask[1, 4:10] = mask[2, 4:9] = mask[3, 4:11] = True  # answer tokens among the targets
    return inputs, targets, mask


def formula_loss(pc, pr, rc, rr, beta):
    """-log sigma(beta[(pc - rc) - (pr - rr)]) written out with exp, averaged over the pairs."""
    margins = beta * ((pc - rc) - (pr - rr))
    return (torch.log(1 + torch.exp(-margins))).mean().detach()


def test_loss_and_gradients_equal_the_formula_on_a_hand_made_example():
    beta = 0.3
    policy_chosen = torch.tensor([-12.0, -7.5, -20.0], dtype=torch.float64, requires_grad=True)
    policy_rejected = torch.tensor([-15.0, -6.0, -20.5], dtype=torch.float64, requires_grad=True)
    reference_chosen = torch.tensor([-13.0, -7.0, -19.0], dtype=torch.float64)
    reference_rejected = torch.tensor([-14.0, -6.5, -21.0], dtype=torch.float64)
    loss, metrics = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta)
    loss.backward()
    loss = loss.detach()
    # by hand: margins 0.3 * ((1) - (-1)) = 0.6, 0.3 * ((-0.5) - (0.5)) = -0.3, 0.3 * ((-1) - (0.5)) = -0.45
    margins = torch.tensor([0.6, -0.3, -0.45], dtype=torch.float64)
    expected = torch.log(1 + torch.exp(-margins)).mean()
    assert math.isclose(float(loss), float(expected), rel_tol=1e-12)
    assert math.isclose(float(loss), float(formula_loss(policy_chosen, policy_rejected, reference_chosen,
                                                        reference_rejected, beta)), rel_tol=1e-12)
    # d loss / d log pi(y_w) = -(beta / B) sigma(-m); d loss / d log pi(y_l) = +(beta / B) sigma(-m)
    expected_chosen_grad = -(beta / 3) * torch.sigmoid(-margins)
    torch.testing.assert_close(policy_chosen.grad, expected_chosen_grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(policy_rejected.grad, -expected_chosen_grad, rtol=1e-12, atol=1e-15)
    assert math.isclose(metrics["accuracy"], 1 / 3, rel_tol=1e-6)
    assert math.isclose(metrics["margin"], float(margins.mean()), rel_tol=1e-12)
    assert math.isclose(metrics["chosen_reward"], 0.3 * (1 - 0.5 - 1) / 3, rel_tol=1e-12)
    assert math.isclose(metrics["rejected_reward"], 0.3 * (-1 + 0.5 + 0.5) / 3, abs_tol=1e-15)


def test_raising_the_chosen_answers_log_prob_lowers_the_loss():
    reference = torch.tensor([-10.0, -10.0]), torch.tensor([-10.0, -10.0])
    losses = [float(dpo_loss(torch.tensor([-10.0 + shift, -11.0]), torch.tensor([-10.0, -10.0]), *reference,
                             beta=0.1)[0]) for shift in (-2.0, -1.0, 0.0, 1.0, 2.0)]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))


def test_answer_log_prob_is_the_sum_over_answer_tokens_only():
    model = tiny_model()
    inputs, targets, mask = pair_batch()
    summed = answer_log_probs(model, inputs, targets, mask)
    logits, _ = model(inputs)
    for row in range(4):
        by_hand = sum(torch.log_softmax(logits[row, t], dim=-1)[targets[row, t]] for t in range(targets.size(1))
                      if mask[row, t])
        torch.testing.assert_close(summed[row], by_hand, rtol=1e-5, atol=1e-5)
    changed = targets.clone()
    changed[:, :4] = (changed[:, :4] + 1) % 41  # other prompt targets: not part of the answer
    assert torch.equal(answer_log_probs(model, inputs, changed, mask), summed)
    longer = mask.clone()
    longer[0, 8] = True  # one more answer token: the sum falls (a log-probability is negative); a mean need not
    assert answer_log_probs(model, inputs, targets, longer)[0] < summed[0]


def test_loss_starts_at_exactly_log_2_with_the_adapters_switched_off_as_reference():
    model = add_lora(tiny_model(), rank=4, alpha=8)
    inputs, targets, mask = pair_batch()
    with torch.no_grad(), adapters_disabled(model):
        reference = answer_log_probs(model, inputs, targets, mask)  # computed once, before training
    policy = answer_log_probs(model, inputs, targets, mask)
    loss, metrics = dpo_loss(policy[:2], policy[2:], reference[:2], reference[2:], beta=0.1)
    assert float(loss.detach()) == float(torch.tensor(math.log(2), dtype=torch.float32))
    assert metrics["margin"] == 0.0 and metrics["accuracy"] == 0.0


def test_dpo_steps_make_the_model_prefer_the_chosen_answers_and_keep_the_base():
    model = add_lora(tiny_model(), rank=4, alpha=8)
    base_weight = model.blocks[0].attention.qkv_proj.weight.clone()
    inputs, targets, mask = pair_batch()
    with torch.no_grad(), adapters_disabled(model):
        reference = answer_log_probs(model, inputs, targets, mask)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    history = []
    for _ in range(30):
        policy = answer_log_probs(model, inputs, targets, mask)
        loss, metrics = dpo_loss(policy[:2], policy[2:], reference[:2], reference[2:], beta=0.5)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(metrics)
    assert history[0]["loss"] == float(torch.tensor(math.log(2), dtype=torch.float32))
    assert history[-1]["loss"] < 0.3 and history[-1]["accuracy"] == 1.0
    assert history[-1]["chosen_reward"] > history[-1]["rejected_reward"]
    assert torch.equal(model.blocks[0].attention.qkv_proj.weight, base_weight)


def test_full_fine_tuning_reference_is_the_model_before_its_first_step():
    model = tiny_model()
    inputs, targets, mask = pair_batch()
    with torch.no_grad():
        reference = answer_log_probs(model, inputs, targets, mask)  # the frozen copy's numbers, kept, not the copy
    policy = answer_log_probs(model, inputs, targets, mask)
    loss, _ = dpo_loss(policy[:2], policy[2:], reference[:2], reference[2:], beta=0.1)
    assert float(loss.detach()) == float(torch.tensor(math.log(2), dtype=torch.float32))
    loss.backward()
    assert all(parameter.grad is not None for parameter in model.parameters())


def test_fast_answer_log_probs_equal_the_full_logits_version():
    from llm.dpo import fast_answer_log_probs

    model = tiny_model()
    inputs, targets, mask = pair_batch()
    torch.testing.assert_close(fast_answer_log_probs(model, inputs, targets, mask),
                               answer_log_probs(model, inputs, targets, mask))


def test_pairs_choose_a_right_sample_against_the_worst_wrong_one():
    from llm.dpo import pair_from_samples
    from llm.instructions import surname_example, translation_example

    example = surname_example("Abaimov", "Russian")
    pair = pair_from_samples("surnames", example, ["Polish", "Russian", "Czech"])
    assert pair["chosen"] == "Russian" and pair["rejected"] in ("Polish", "Czech")
    assert pair["chosen_score"] == 1.0 and pair["rejected_score"] == 0.0 and pair["chosen_from"] == "sample"
    spanish = translation_example("I am hungry.", "Tengo hambre.")
    pair = pair_from_samples("translation", spanish, ["Tengo hambre mucho.", "Yo soy un gato.", "Tengo hambre."])
    assert pair["chosen"] == "Tengo hambre." and pair["rejected"] == "Yo soy un gato."
    assert pair["chosen_from"] == "sample" and pair["chosen_score"] > pair["rejected_score"]


def test_pairs_take_the_reference_when_the_best_sample_is_still_wrong():
    from llm.dpo import pair_from_samples, sentence_score
    from llm.instructions import surname_example, translation_example

    all_wrong = pair_from_samples("surnames", surname_example("Abaimov", "Russian"), ["Polish", "Czech"])
    assert all_wrong["chosen"] == "Russian" and all_wrong["chosen_from"] == "reference"
    assert all_wrong["rejected"] in ("Polish", "Czech")
    spanish = translation_example("I stayed at home all day.", "Me quedé en casa todo el día.")
    samples = ["Me quedé en la casa.", "Estuve todo.", "Por favor nadie."]
    less_wrong = sentence_score("translation", samples[0], spanish)
    assert 0 < less_wrong < 50  # better than the others, and still wrong: never the chosen answer
    pair = pair_from_samples("translation", spanish, samples)
    assert pair["chosen"] == "Me quedé en casa todo el día." and pair["chosen_from"] == "reference"
    assert math.isclose(pair["chosen_score"], 100.0) and pair["rejected_score"] < less_wrong
    # the same samples with the threshold below the best one's BLEU: the best sample is right and is chosen
    assert pair_from_samples("translation", spanish, samples, right_bleu=less_wrong)["chosen"] == samples[0]


def test_pairs_are_none_when_every_sample_is_right():
    from llm.dpo import pair_from_samples
    from llm.instructions import surname_example, translation_example

    assert pair_from_samples("surnames", surname_example("Abaimov", "Russian"), ["Russian", "russian."]) is None
    spanish = translation_example("I am hungry.", "Tengo hambre.")
    assert pair_from_samples("translation", spanish, ["Tengo hambre.", "Tengo hambre"]) is None


def test_entity_answers_are_right_only_when_their_names_are_exactly_the_gold_ones():
    from llm.dpo import is_right, pair_from_samples, sentence_score
    from llm.instructions import entity_example

    chars = list("江泽民在北京")
    example = entity_example(chars, ["B-PER", "M-PER", "E-PER", "O", "B-LOC", "E-LOC"])
    reference = example.messages[-1]["content"]
    half = "person: 江泽民\nplace: none\norganisation: none"
    assert sentence_score("entities", reference, example) == 1.0
    assert 0 < sentence_score("entities", half, example) < 1 and not is_right("entities", 0.67)
    pair = pair_from_samples("entities", example, [half, "person: none\nplace: none\norganisation: none"])
    assert pair["chosen"] == reference and pair["chosen_from"] == "reference" and pair["rejected_score"] == 0.0
    nobody = entity_example(list("今天很好"), ["O"] * 4)  # a sentence that names nobody: "none" is right
    assert sentence_score("entities", nobody.messages[-1]["content"], nobody) == 1.0
    pair = pair_from_samples("entities", nobody, [nobody.messages[-1]["content"], "person: 今天\nplace: none"])
    assert pair["chosen_from"] == "sample" and pair["rejected"].startswith("person: 今天")


def test_nll_term_equals_the_rpo_formula_in_value_and_gradient():
    beta, alpha = 0.2, 0.7
    policy_chosen = torch.tensor([-12.0, -7.5], dtype=torch.float64, requires_grad=True)
    policy_rejected = torch.tensor([-15.0, -6.0], dtype=torch.float64, requires_grad=True)
    reference_chosen = torch.tensor([-13.0, -7.0], dtype=torch.float64)
    reference_rejected = torch.tensor([-14.0, -6.5], dtype=torch.float64)
    lengths = torch.tensor([4.0, 3.0], dtype=torch.float64)
    loss, metrics = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, lengths,
                             nll_weight=alpha)
    loss.backward()
    margins = torch.tensor([0.2 * (1 + 1), 0.2 * (-0.5 - 0.5)], dtype=torch.float64)
    nll = (12.0 / 4 + 7.5 / 3) / 2  # -log pi(y_w|x) / |y_w|, averaged over the pairs
    expected = float(torch.log(1 + torch.exp(-margins)).mean()) + alpha * nll
    assert math.isclose(float(loss.detach()), expected, rel_tol=1e-12)
    assert math.isclose(metrics["loss"], expected, rel_tol=1e-12) and math.isclose(metrics["chosen_nll"], nll)
    assert math.isclose(metrics["dpo_loss"], float(torch.log(1 + torch.exp(-margins)).mean()), rel_tol=1e-12)
    # d loss / d log pi(y_w) = -(beta / B) sigma(-m) - alpha / (B |y_w|); the rejected gradient is DPO's alone
    expected_chosen_grad = -(beta / 2) * torch.sigmoid(-margins) - alpha / (2 * lengths)
    torch.testing.assert_close(policy_chosen.grad, expected_chosen_grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(policy_rejected.grad, (beta / 2) * torch.sigmoid(-margins), rtol=1e-12, atol=1e-15)
    # weight 0: DPO alone, whatever the lengths
    plain, _ = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, lengths, 0.0)
    assert math.isclose(float(plain.detach()), metrics["dpo_loss"], rel_tol=1e-12)


def test_held_out_accuracy_is_broken_down_per_task():
    from llm.dpo import accuracy_by_task

    margins = torch.tensor([0.5, -0.1, 0.2, 0.0, 0.3, -0.4])
    tasks = ["surnames", "surnames", "translation", "translation", "translation", "entities"]
    assert accuracy_by_task(margins, tasks) == {"accuracy_entities": 0.0, "accuracy_surnames": 0.5,
                                                "accuracy_translation": pytest.approx(2 / 3)}


class CharacterTokenizer:
    """A stand-in tokenizer: one token per character of the user's question, no template, no end token."""

    stop_ids = []

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return messages[-1]["content"]

    def encode(self, text):
        return [ord(character) - ord("a") for character in text]

    def decode(self, tokens):
        return "".join(chr(ord("a") + token) for token in tokens)


def test_samples_of_several_prompts_decoded_together_are_each_prompts_own():
    from types import SimpleNamespace

    from llm.dpo import sample_answers
    from tests.test_llm_chat_eval import lively_model

    model = lively_model()  # 61 tokens: the letters a... and a few more
    questions = ["abc", "fghijkl", "e", "hhhhh", "xyz"]
    examples = [SimpleNamespace(messages=[{"role": "user", "content": q}, {"role": "assistant", "content": ""}])
                for q in questions]
    tokenizer = CharacterTokenizer()
    one_by_one = sample_answers(model, tokenizer, examples, 2, 0.0, 10, torch.Generator(), prompts_per_batch=1)
    together = sample_answers(model, tokenizer, examples, 2, 0.0, 10, torch.Generator(), prompts_per_batch=3)
    assert together == one_by_one  # greedy: every row decodes as it would alone, in its own prompt's place
    assert len({answers[0] for answers in together}) == len(questions) and all(a == b for a, b in together)


def test_a_resumed_dpo_run_keeps_its_saved_beta_and_pairing_settings():
    from types import SimpleNamespace

    from llm.dpo import FIXED_ON_RESUME, QUICK, build_parser
    from llm.runs import CheckpointError
    from llm.sft import take_saved_settings

    saved = {"beta": 0.3, "nll_weight": 0.0, "prompts": "surnames=5", "right_bleu": 40.0}
    args = SimpleNamespace(**vars(build_parser().parse_args(["--resume"])))
    take_saved_settings(args, ["--resume"], saved, 1, build_parser, QUICK, FIXED_ON_RESUME)
    assert (args.beta, args.nll_weight, args.prompts, args.right_bleu) == (0.3, 0.0, "surnames=5", 40.0)
    with pytest.raises(CheckpointError, match="--beta"):
        take_saved_settings(build_parser().parse_args(["--resume", "--beta", "0.2"]), ["--resume", "--beta", "0.2"],
                            saved, 1, build_parser, QUICK, FIXED_ON_RESUME)


def test_bad_pairing_and_nll_flags_end_in_one_line(run_cli, tmp_path):
    not_pairs = tmp_path / "pairs.json"
    not_pairs.write_text('{"train": [{"prompt": []}], "held_out": []}')
    for arguments, message in ((["--right-bleu", "150"], "--right-bleu"), (["--right-bleu", "x"], "--right-bleu"),
                               (["--nll-weight", "-1"], "--nll-weight"),
                               (["--pairs", str(tmp_path / "missing.json")], "does not exist"),
                               (["--pairs", str(not_pairs)], "is not a pairs.json")):
        result = run_cli("llm/dpo.py", *arguments, "--out-dir", str(tmp_path / "dpo"), timeout=60)
        lines = result.stderr.strip().splitlines()
        assert result.returncode in (1, 2) and "Traceback" not in result.stderr and message in lines[-1], arguments
    assert not (tmp_path / "dpo").exists()


@pytest.mark.slow
def test_dpo_script_starts_at_log_2_keeps_prompts_apart_and_resumes_exactly(tmp_path, capsys):
    """On a tiny model pretrained and chat-tuned here: the held-out loss before the first step is exactly log 2,
    no held-out pair shares a prompt with a training pair, and a resumed run equals an uninterrupted one."""
    import json

    from data import fetch
    from llm.dpo import is_right
    from llm.dpo import main as dpo
    from llm.sft import main as sft
    from llm.train import main as pretrain
    from tests.test_llm_sft import TINY_PRETRAIN, TINY_SFT

    text_file = tmp_path / "wiki.txt"
    text_file.write_text((fetch("wikitext-2") / "valid.raw").read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    pretrain([*TINY_PRETRAIN, "--text-file", str(text_file), "--data-dir", str(tmp_path / "data"),
              "--out-dir", str(tmp_path / "base")])
    sft([*TINY_SFT, "--checkpoint", str(tmp_path / "base" / "best.pt"), "--out-dir", str(tmp_path / "sft")])
    common = ["--checkpoint", str(tmp_path / "sft" / "model.pt"), "--prompts", "surnames=12,translation=6",
              "--held-out", "surnames=6,translation=4", "--samples", "3", "--batch-size", "4", "--max-steps", "6",
              "--eval-every", "3", "--max-length", "96", "--dtype", "float32", "--device", "cpu", "--lr", "1e-2"]
    dpo([*common, "--out-dir", str(tmp_path / "straight")])
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and rows[0]["val_dpo_loss"] == float(torch.tensor(math.log(2), dtype=torch.float32))
    assert math.isclose(rows[0]["val_loss"], rows[0]["val_dpo_loss"] + rows[0]["val_chosen_nll"], rel_tol=1e-6)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    for name in ("model.pt", "adapters.pt", "loss.png", "best.pt"):
        assert (tmp_path / "straight" / name).is_file()
    pairs = json.loads((tmp_path / "straight" / "pairs.json").read_text())
    assert {name for name in rows[-1] if name.startswith("val_accuracy_")} == \
        {f"val_accuracy_{pair['task']}" for pair in pairs["held_out"]}  # the held-out accuracy of each task
    train_prompts = {json.dumps(pair["prompt"]) for pair in pairs["train"]}
    assert pairs["held_out"] and not train_prompts & {json.dumps(pair["prompt"]) for pair in pairs["held_out"]}
    assert all(pair["chosen_score"] > pair["rejected_score"] for pair in pairs["train"] + pairs["held_out"])
    assert all(is_right(pair["task"], pair["chosen_score"]) and not is_right(pair["task"], pair["rejected_score"])
               for pair in pairs["train"] + pairs["held_out"])
    dpo([*common, "--out-dir", str(tmp_path / "stopped"), "--stop-at-step", "4"])
    assert "resume with: python llm/dpo.py" in capsys.readouterr().out
    dpo([*common, "--out-dir", str(tmp_path / "stopped"), "--resume"])
    straight = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in straight] == \
           [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in resumed]
    dpo([*common, "--out-dir", str(tmp_path / "only"), "--pairs-only"])  # the same pairs, and no training
    assert json.loads((tmp_path / "only" / "pairs.json").read_text()) == pairs
    assert not (tmp_path / "only" / "metrics.jsonl").exists()
    # the same pairs given with --pairs: no sampling, and the same run
    dpo([*common, "--out-dir", str(tmp_path / "reused"), "--pairs", str(tmp_path / "straight" / "pairs.json")])
    assert json.loads((tmp_path / "reused" / "pairs.json").read_text()) == pairs
    reused = [json.loads(line) for line in (tmp_path / "reused" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in straight] == \
           [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in reused]
