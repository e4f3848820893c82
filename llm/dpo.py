"""Direct preference optimisation by hand: teach the model to prefer one answer over another, with no reward model.

    python llm/dpo.py --adapters runs/sft/adapters.pt     # on top of the SFT run: pairs made, then DPO (LoRA),
                                                          # about 10 min on 2 cores (AMD EPYC, bf16)
    python llm/dpo.py --quick                             # fewer pairs and steps: a few minutes on 2 cores
    python llm/dpo.py --pairs-only                        # make the preference pairs and stop
    python llm/dpo.py --pairs runs/dpo/pairs.json ...     # train again on the same pairs, other settings

The pairs come from the model's own answers. For a prompt whose right answer is known (a translation, a surname's
language, the names in a sentence), sample several answers and score each with the task's metric. The chosen
answer is always a right one: the best sample when it is right (the surname's language, every name found, a
translation with sentence BLEU of at least --right-bleu), otherwise the reference answer; the rejected answer is
the worst sample that is wrong. A prompt whose samples are all right gives no pair. Training pairs are made from
the tasks' train prompts, held-out pairs from their valid prompts, so no held-out pair shares a prompt with
training. They are written to OUT_DIR/pairs.json and reused by --resume. Every evaluation reports the held-out
preference accuracy in all and per task (val_accuracy_translation, ...): the tasks differ a great deal.

The loss (Rafailov et al., 2023), for a prompt x, a chosen answer y_w and a rejected answer y_l:

    loss = -log sigma( beta [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

log pi(y|x) is the log-probability of the whole answer: the SUM of its tokens' log-probabilities (never the
mean), over the answer's tokens only (the prompt's tokens are context, not something the model says).
pi_ref is the model before DPO: with LoRA, the same model with its adapters switched off (no second copy in
memory); for full fine-tuning, the model as it was before the first step. Either way its log-probabilities of
every pair are computed once, before training, and kept as numbers.

--nll-weight alpha adds the chosen answer's negative log-likelihood per token (RPO, Pang et al., 2024):

    loss = loss_DPO + alpha * ( -log pi(y_w|x) / |y_w| )

DPO alone only widens the gap between the two answers, and can do so by making both less likely; the second term
keeps the chosen (right) answers likely while the gap widens.
"""

import argparse
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import DataError
from llm.runs import (
    CheckpointError,
    StopFlag,
    check_run_folder,
    load_checkpoint,
    pick_device,
    remove_run_files,
    restore_rng_states,
    rng_states,
    save_checkpoint,
    warn_if_threads_changed,
    write_text_atomically,
)


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target_t | tokens before it) for every position: logits (B, T, V), targets (B, T) -> (B, T)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)  # (B, T, V), in float32 even from a bf16 model
    return log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)


def answer_log_probs(model, inputs: torch.Tensor, targets: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) of each row: the sum of the answer tokens' log-probabilities. All (B, T) -> (B,).

    answer_mask[b, t] is True where targets[b, t] is a token of the answer (the model's turn and its end token).
    """
    logits, _ = model(inputs)  # (B, T, V)
    return (token_log_probs(logits, targets) * answer_mask).sum(dim=-1)  # (B,)


def implicit_rewards(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float):
    """r(y) = beta (log pi(y|x) - log pi_ref(y|x)) of the chosen and of the rejected answers (each (B,))."""
    return beta * (policy_chosen - reference_chosen), beta * (policy_rejected - reference_rejected)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, chosen_lengths: torch.Tensor | None = None,
             nll_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The DPO loss of a batch of pairs (each argument (B,): summed answer log-probs) and its metrics.

    The implicit reward of an answer is r(y) = beta (log pi(y|x) - log pi_ref(y|x)): how much more likely the
    model has made it than the reference did. The loss pushes r(y_w) - r(y_l) up through a logistic link.
    With nll_weight alpha > 0 (chosen_lengths (B,): the chosen answers' token counts) the loss gains
    alpha * mean(-log pi(y_w|x) / |y_w|), the chosen answers' negative log-likelihood per token (RPO).
    """
    chosen_rewards, rejected_rewards = implicit_rewards(policy_chosen, policy_rejected, reference_chosen,
                                                        reference_rejected, beta)  # each (B,)
    margins = chosen_rewards - rejected_rewards  # (B,)
    preference_loss = -F.logsigmoid(margins).mean()  # -log sigma(m), computed without overflow for large |m|
    loss = preference_loss
    metrics = {
        "dpo_loss": float(preference_loss.detach()),
        "accuracy": float((margins > 0).float().mean()),  # pairs where the chosen answer has the larger reward
        "margin": float(margins.detach().mean()),
        "chosen_reward": float(chosen_rewards.detach().mean()),
        "rejected_reward": float(rejected_rewards.detach().mean()),
    }
    if chosen_lengths is not None:
        chosen_nll = (-policy_chosen / chosen_lengths).mean()  # nats per chosen answer token
        metrics["chosen_nll"] = float(chosen_nll.detach())
        if nll_weight:
            loss = preference_loss + nll_weight * chosen_nll
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def fast_answer_log_probs(model, inputs, targets, answer_mask) -> torch.Tensor:
    """answer_log_probs with the output layer applied at the answer positions only (the same numbers, faster)."""
    from llm.sft import answer_logits

    logits = answer_logits(model, inputs, answer_mask)  # (N, V)
    picked = token_log_probs(logits[None], targets[answer_mask][None])[0]  # (N,)
    rows = torch.arange(inputs.size(0), device=inputs.device)[:, None].expand_as(answer_mask)[answer_mask]  # (N,)
    return torch.zeros(inputs.size(0), device=inputs.device).index_add(0, rows, picked)  # (B,)


# ---------------------------------------------------------------------------------------------- pairs


RIGHT_BLEU = 50.0  # the default --right-bleu: a translation at or above this sentence BLEU counts as right
NLL_WEIGHT = 1.0  # the default --nll-weight: RPO's alpha (Pang et al., 2024 use 1)
NO_PAIRS = "no preference pairs were made (the model's samples were all equally good): raise --prompts or --samples"


def sentence_score(task: str, answer: str, example) -> float:
    """How good one answer is, by its task's metric: sentence BLEU, right or wrong, sentence entity F1 (1 for an
    answer whose names are exactly the gold ones, "none" included where the sentence names nobody)."""
    from llm.instructions import entity_f1, surname_is_right, tags_from_answer

    if task == "translation":
        import sacrebleu

        return sacrebleu.sentence_bleu(answer, [example.reference]).score
    if task == "surnames":
        return float(surname_is_right(answer, example.reference))
    predicted = tags_from_answer(answer, example.extra["chars"])
    return 1.0 if predicted == list(example.reference) else entity_f1([example.reference], [predicted])


def is_right(task: str, score: float, right_bleu: float = RIGHT_BLEU) -> bool:
    """Whether an answer's score makes it right: the surname's language, every name exactly, or BLEU >= right_bleu."""
    return score >= right_bleu if task == "translation" else score >= 1.0


@torch.no_grad()
def sample_answers(model, tokenizer, examples, samples: int, temperature: float, max_new_tokens: int,
                   generator: torch.Generator, prompts_per_batch: int = 1) -> list[list[str]]:
    """`samples` sampled answers per example. The copies of `prompts_per_batch` prompts of similar lengths are
    decoded as one batch (each row as it would be alone: see generate_batch), which keeps the CPU busier."""
    from llm.chat_eval import generate_batch

    prompts = [tokenizer.encode(tokenizer.apply_chat_template(example.messages[:-1], add_generation_prompt=True))
               for example in examples]
    order = list(range(len(prompts)))
    if prompts_per_batch > 1:
        order.sort(key=lambda i: len(prompts[i]))  # similar lengths together: little padding
    answers = [[] for _ in examples]
    progress = tqdm(total=len(examples), desc="sampling answers", leave=False, dynamic_ncols=True)
    for start in range(0, len(order), prompts_per_batch):
        chunk = order[start : start + prompts_per_batch]
        outputs = generate_batch(model, [prompts[i] for i in chunk for _ in range(samples)], max_new_tokens,
                                 set(tokenizer.stop_ids), temperature=temperature, generator=generator)
        for position, index in enumerate(chunk):
            answers[index] = [tokenizer.decode(output).strip()
                              for output in outputs[position * samples : (position + 1) * samples]]
        progress.update(len(chunk))
    progress.close()
    return answers


def pair_from_samples(task: str, example, answers: list[str], right_bleu: float = RIGHT_BLEU) -> dict | None:
    """A right answer against the model's worst wrong one.

    The chosen answer is the best sample when it is right, otherwise the reference answer: DPO then learns to
    prefer what is right, never merely what is less wrong. The rejected answer is the lowest-scoring wrong sample.
    None when every sample is right (nothing to correct).
    """
    reference = example.messages[-1]["content"]
    scored = sorted(((sentence_score(task, answer, example), answer) for answer in answers), key=lambda x: x[0])
    wrong = [(score, answer) for score, answer in scored
             if not is_right(task, score, right_bleu) and answer.strip() != reference.strip()]
    if not wrong:
        return None
    (rejected_score, rejected), (best_score, best) = wrong[0], scored[-1]
    if is_right(task, best_score, right_bleu) and best.strip():
        chosen, chosen_score, chosen_from = best, best_score, "sample"
    else:
        chosen, chosen_score, chosen_from = reference, sentence_score(task, reference, example), "reference"
    if chosen_score <= rejected_score:
        return None
    return {"task": task, "prompt": example.messages[:-1], "chosen": chosen, "rejected": rejected,
            "chosen_score": chosen_score, "rejected_score": rejected_score, "chosen_from": chosen_from}


def make_pairs(model, tokenizer, counts: dict, split: str, args, log=print) -> list[dict]:
    """Preference pairs from the model's own sampled answers to `counts[task]` prompts of a task split."""
    from llm.chat_eval import MAX_NEW_TOKENS
    from llm.instructions import sample_examples

    generator = torch.Generator().manual_seed(args.seed + (0 if split == "train" else 1))
    pairs = []
    model.eval()
    for task, count in counts.items():
        if not count or task == "chitchat":
            continue
        examples = sample_examples(task, split, count, seed=args.seed + 7)
        answers = sample_answers(model, tokenizer, examples, args.samples, args.temperature, MAX_NEW_TOKENS[task],
                                 generator, args.prompts_per_batch)
        made = [pair for example, sampled in zip(examples, answers)
                if (pair := pair_from_samples(task, example, sampled, args.right_bleu)) is not None]
        references = sum(pair["chosen_from"] == "reference" for pair in made)
        log(f"{split} pairs, {task}: {len(made)} from {len(examples)} prompts ({len(made) - references} with a right "
            f"sample chosen, {references} with the reference)")
        pairs += made
    model.train()
    return pairs


# ---------------------------------------------------------------------------------------------- the script

# The default run fits about 10 minutes on 2 cores: sampling 4 answers to its 460 prompts takes 6 min (about 1 s per
# translation prompt, 0.3 s per surname, 2 s per sentence of entities), a step of 8 pairs about 3 s (AMD EPYC, bf16).
DEFAULT_PROMPTS = "translation=120,surnames=200,entities=40"
DEFAULT_HELD_OUT = "translation=30,surnames=60,entities=10"
QUICK = dict(prompts="translation=60,surnames=60,entities=30", held_out="translation=20,surnames=20,entities=10",
             samples=4, max_steps=30, eval_every=10, out_dir="runs/dpo-quick")
FIXED_ON_RESUME = ("gguf", "hf", "checkpoint", "adapters", "dtype", "pairs", "prompts", "held_out", "samples",
                   "temperature", "right_bleu", "beta", "nll_weight", "max_length", "full",
                   "lora_rank", "lora_alpha", "lora_targets", "lora_dropout", "batch_size", "max_steps", "lr",
                   "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip", "eval_every", "seed")
RUN_FILES = ("last.pt", "best.pt", "*.tmp", "metrics.jsonl", "loss.png", "adapters.pt", "model.pt", "pairs.json")


def bleu_score(text: str) -> float:
    """An argparse type: a BLEU score, 0 to 100."""
    from llm.runs import non_negative_float

    value = non_negative_float(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"a BLEU score is between 0 and 100, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from llm.chat_model import add_model_arguments
    from llm.runs import non_negative_float, positive_float, positive_int
    from llm.sft import add_training_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.set_defaults(dtype="bfloat16")
    parser.add_argument("--adapters", action="append", default=[],
                        help="LoRA adapters merged into the model before DPO (the SFT run's adapters.pt)")
    pairs = parser.add_argument_group("preference pairs")
    pairs.add_argument("--prompts", default=DEFAULT_PROMPTS, help="train prompts per task that pairs are made from")
    pairs.add_argument("--held-out", default=DEFAULT_HELD_OUT,
                       help="valid prompts per task for the held-out pairs (never a training prompt)")
    pairs.add_argument("--samples", type=positive_int, default=4, help="answers sampled per prompt")
    pairs.add_argument("--prompts-per-batch", type=positive_int, default=1,
                       help="prompts whose samples are decoded together (their copies in one batch)")
    pairs.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature of the answers")
    pairs.add_argument("--right-bleu", type=bleu_score, default=RIGHT_BLEU,
                       help="sentence BLEU from which a sampled translation counts as right (and may be chosen)")
    pairs.add_argument("--pairs-only", action="store_true", help="make and write the pairs, then stop")
    pairs.add_argument("--pairs", default=None,
                       help="train on the pairs.json of an earlier run (of the same model) instead of making pairs")
    pairs.add_argument("--beta", type=positive_float, default=0.1,
                       help="DPO's beta: how far the model may move from the reference (smaller = further)")
    pairs.add_argument("--nll-weight", type=non_negative_float, default=NLL_WEIGHT,
                       help="alpha of the chosen answers' NLL per token added to the DPO loss (RPO; 0 = DPO alone)")
    pairs.add_argument("--max-length", type=positive_int, default=256, help="tokens per prompt and answer")
    add_training_arguments(parser, dict(max_steps=50, lr_lora=5e-4, lr_full=1e-6, warmup_steps=10, eval_every=25,
                                        out_dir="runs/dpo", quick_help="fewer pairs and 30 steps, into runs/dpo-quick"))
    return parser


def read_pairs(path: Path) -> dict:
    """The pairs.json of an earlier run ({"train": [...], "held_out": [...]}); ValueError when it is not one."""
    try:
        pairs = json.loads(path.read_text(encoding="utf-8"))
        keys = ("prompt", "chosen", "rejected")
        if not all(isinstance(pair, dict) and all(key in pair for key in keys) for part in ("train", "held_out")
                   for pair in pairs[part]):
            raise ValueError
    except FileNotFoundError:
        raise ValueError(f"--pairs {path} does not exist") from None
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"--pairs {path} is not a pairs.json written by llm/dpo.py") from None
    return pairs


def encode_pairs(tokenizer, pairs: list, max_length: int) -> tuple[list, list]:
    """Each pair as ((chosen ids, mask), (rejected ids, mask)), and each kept pair's task; a pair with an answer
    cut away entirely is dropped."""
    from llm.conversations import render_with_mask

    encoded, tasks = [], []
    for pair in pairs:
        chosen = render_with_mask(tokenizer, pair["prompt"] + [{"role": "assistant", "content": pair["chosen"]}],
                                  max_length)
        rejected = render_with_mask(tokenizer, pair["prompt"] + [{"role": "assistant", "content": pair["rejected"]}],
                                    max_length)
        if any(chosen[1][1:]) and any(rejected[1][1:]):
            encoded.append((chosen, rejected))
            tasks.append(pair.get("task", "other"))
    return encoded, tasks


def chosen_lengths(encoded: list) -> torch.Tensor:
    """(number of pairs,): the token count of each chosen answer (its end token included), for the NLL term."""
    return torch.tensor([float(sum(chosen[1][1:])) for chosen, _ in encoded])


def pair_log_probs(model, encoded: list, indices: list, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs of the chosen and the rejected answers of some pairs: two (B,) tensors."""
    from llm.conversations import collate

    rows = [encoded[i][0] for i in indices] + [encoded[i][1] for i in indices]
    inputs, targets, mask = collate(rows, range(len(rows)), pad_id)
    log_probs = fast_answer_log_probs(model, inputs.to(device), targets.to(device), mask.to(device))  # (2B,)
    return log_probs[: len(indices)], log_probs[len(indices):]


@torch.no_grad()
def all_log_probs(model, encoded: list, pad_id: int, device, batch_size: int) -> torch.Tensor:
    """(number of pairs, 2): chosen and rejected log-probs of every pair, in batches."""
    model.eval()
    rows = []
    for start in range(0, len(encoded), batch_size):
        chosen, rejected = pair_log_probs(model, encoded, list(range(start, min(len(encoded), start + batch_size))),
                                          pad_id, device)
        rows.append(torch.stack([chosen, rejected], dim=1).float().cpu())
    model.train()
    return torch.cat(rows) if rows else torch.zeros(0, 2)


def reference_log_probs(model, encoded: list, pad_id: int, device, batch_size: int) -> torch.Tensor:
    """pi_ref's log-probs, computed once: the model with its adapters off (LoRA), or as it is before training."""
    from llm.lora import adapters_disabled

    with adapters_disabled(model):
        return all_log_probs(model, encoded, pad_id, device, batch_size)


def accuracy_by_task(margins: torch.Tensor, tasks: list) -> dict:
    """The preference accuracy of each task's pairs (margins (B,), tasks: B names): {"accuracy_<task>": ...}."""
    found = {}
    for task in sorted(set(tasks)):
        rows = torch.tensor([name == task for name in tasks])  # (B,)
        found[f"accuracy_{task}"] = float((margins[rows] > 0).float().mean())
    return found


def held_out_metrics(model, encoded: list, tasks: list, reference: torch.Tensor, args, pad_id: int,
                     device) -> dict:
    """DPO loss, preference accuracy (in all and per task), reward margin, the chosen/rejected rewards and the
    chosen answers' NLL per token on the held-out pairs; val_loss is the objective trained (with --nll-weight's
    term)."""
    policy = all_log_probs(model, encoded, pad_id, device, args.batch_size)
    _, metrics = dpo_loss(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], args.beta,
                          chosen_lengths(encoded), args.nll_weight)
    chosen_rewards, rejected_rewards = implicit_rewards(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1],
                                                        args.beta)  # each (pairs,)
    metrics.update(accuracy_by_task(chosen_rewards - rejected_rewards, tasks))
    return {f"val_{name}": value for name, value in metrics.items()}


class PreferenceRun:
    """One DPO run: the model (SFT merged in, LoRA on top), its pairs and reference log-probs, the optimizer."""

    def __init__(self, args, argv, log=print):
        from llm.chat_model import load_chat_model
        from llm.lora import merge_adapter_files
        from llm.sft import base_record, take_saved_settings

        self.args, self.log, self.out_dir = args, log, Path(args.out_dir)
        self.device = pick_device(args.device)
        check_run_folder(self.out_dir, args.resume, args.overwrite)
        self.given_pairs = read_pairs(Path(args.pairs)) if args.pairs and not args.resume else None
        self.checkpoint = None
        if args.resume:
            self.checkpoint = load_checkpoint(self.out_dir / "last.pt", "DPO",
                                              ("args", "step", "optimizer", "rng", "base", "reference"))
            take_saved_settings(args, argv, self.checkpoint["args"], 1, build_parser, QUICK,
                                FIXED_ON_RESUME)
        if args.lr is None:
            args.lr = 1e-6 if args.full else 5e-4
        self.base = base_record(args)
        self.model, self.tokenizer = load_chat_model(gguf=args.gguf, hf=args.hf, checkpoint=args.checkpoint,
                                                     notice=lambda message: None)
        merge_adapter_files(self.model, args.adapters)  # the model DPO starts from, and its reference
        for parameter in self.model.parameters():
            parameter.requires_grad_(True)
        if args.dtype == "bfloat16" and not args.full:
            self.model.to(torch.bfloat16)
        self.model.to(self.device)
        self.pad_id = self.tokenizer.eos_id() if self.tokenizer.eos_id() is not None else 0

    def load_pairs(self) -> dict:
        """The pairs of a resumed run, or new ones made from the model's own sampled answers."""
        from llm.sft import parse_mix

        if self.checkpoint is not None:
            return json.loads((self.out_dir / "pairs.json").read_text(encoding="utf-8"))
        if self.given_pairs is not None:
            self.log(f"{len(self.given_pairs['train'])} training and {len(self.given_pairs['held_out'])} held-out "
                     f"pairs from {self.args.pairs}")
            return self.given_pairs
        started = time.perf_counter()
        pairs = {"train": make_pairs(self.model, self.tokenizer, parse_mix(self.args.prompts, "--prompts"), "train",
                                     self.args, self.log),
                 "held_out": make_pairs(self.model, self.tokenizer, parse_mix(self.args.held_out, "--held-out"),
                                        "valid", self.args, self.log)}
        self.log(f"made {len(pairs['train'])} training and {len(pairs['held_out'])} held-out pairs in "
                 f"{time.perf_counter() - started:.0f} s")
        return pairs

    def prepare(self, pairs: dict):
        """Encode the pairs, put the adapters on, and compute (or restore) the reference log-probs once."""
        from llm.conversations import LengthBuckets
        from llm.sft import attach_adapters, make_optimizer

        self.encoded, _ = encode_pairs(self.tokenizer, pairs["train"], self.args.max_length)
        self.held_out, self.held_out_tasks = encode_pairs(self.tokenizer, pairs["held_out"], self.args.max_length)
        self.chosen_lengths = chosen_lengths(self.encoded)  # (pairs,)
        if not self.encoded or not self.held_out:
            raise ValueError(NO_PAIRS)
        lengths = [max(len(chosen[0]), len(rejected[0])) for chosen, rejected in self.encoded]
        self.buckets = LengthBuckets(lengths, min(self.args.batch_size, len(lengths)), self.args.seed)
        torch.manual_seed(self.args.seed)
        self.trainable = attach_adapters(self.model, self.args)
        self.optimizer = make_optimizer(self.trainable, self.args)
        if self.checkpoint is not None:
            self.reference = self.checkpoint["reference"]
        else:
            started = time.perf_counter()
            self.reference = {name: reference_log_probs(self.model, encoded, self.pad_id, self.device,
                                                        self.args.batch_size)
                              for name, encoded in (("train", self.encoded), ("held_out", self.held_out))}
            self.log(f"reference log-probabilities of {len(self.encoded)} + {len(self.held_out)} pairs in "
                     f"{time.perf_counter() - started:.0f} s (computed once, adapters off)")

    def state(self, step: int, best_val_loss: float) -> dict:
        from llm.sft import trained_state

        return {**trained_state(self.model, self.args), "optimizer": self.optimizer.state_dict(), "step": step,
                "best_val_loss": best_val_loss, "rng": rng_states(), "args": dict(vars(self.args)),
                "base": self.base, "base_config": self.model.config.to_dict(), "reference": self.reference,
                "threads": torch.get_num_threads()}

    def restore(self) -> tuple[int, float]:
        from llm.sft import restore_trained_state

        try:
            restore_trained_state(self.model, self.checkpoint)
            self.optimizer.load_state_dict(self.checkpoint["optimizer"])
        except (RuntimeError, KeyError, ValueError) as error:
            raise CheckpointError(f"{self.out_dir / 'last.pt'} does not fit this run: "
                                  f"{str(error).splitlines()[0][:200]}") from None
        restore_rng_states(self.checkpoint["rng"])
        warn_if_threads_changed(self.checkpoint.get("threads"))
        step = int(self.checkpoint["step"])
        metrics = self.out_dir / "metrics.jsonl"
        if metrics.exists():
            kept = [line for line in metrics.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            write_text_atomically(metrics, "".join(line + "\n" for line in kept))
        self.log(f"resumed from {self.out_dir / 'last.pt'} at step {step}")
        return step, float(self.checkpoint["best_val_loss"])

    def evaluate(self) -> dict:
        return held_out_metrics(self.model, self.held_out, self.held_out_tasks, self.reference["held_out"],
                                self.args, self.pad_id, self.device)


def dpo_step(run: PreferenceRun, step: int) -> dict:
    """One optimizer step on one batch of training pairs; returns the batch's DPO metrics and gradient norm."""
    from llm.train import learning_rate

    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(step, run.args)
    indices = run.buckets.batch(step)
    chosen, rejected = pair_log_probs(run.model, run.encoded, indices, run.pad_id, run.device)
    reference = run.reference["train"][indices].to(run.device)  # (B, 2)
    lengths = run.chosen_lengths[indices].to(run.device)  # (B,)
    loss, metrics = dpo_loss(chosen, rejected, reference[:, 0], reference[:, 1], run.args.beta, lengths,
                             run.args.nll_weight)
    loss.backward()
    metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(run.trainable, run.args.grad_clip or float("inf")))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return metrics


def preference_loop(run: PreferenceRun, start_step: int, best_val_loss: float) -> tuple[str, int]:
    """Steps to --max-steps with held-out metrics, checkpoints and Ctrl-C; returns (status, last step)."""
    from llm.sft import save_best_and_last
    from llm.train import learning_rate

    args, out_dir = run.args, run.out_dir
    stop = StopFlag()
    # a SIGTERM (how a job scheduler or `kill` stops a run) is taken as a Ctrl-C: save at the step boundary
    previous_term = signal.signal(signal.SIGTERM, lambda signum, frame: setattr(stop, "requested", True))
    status, completed, started = "finished", start_step, time.perf_counter()
    with open(out_dir / "metrics.jsonl", "a") as metrics_file:
        if start_step == 0:  # before the first step: the loss is log 2 and no pair is preferred yet
            metrics_file.write(json.dumps({"step": 0, **run.evaluate()}) + "\n")
        progress = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps,
                        dynamic_ncols=True)
        for step in progress:
            metrics = dpo_step(run, step)
            if not math.isfinite(metrics["loss"]):
                status = "diverged"
                break
            completed = step + 1
            record = {"step": completed, "train_loss": metrics.pop("loss"), "lr": learning_rate(step, args),
                      **{f"train_{k}": v for k, v in metrics.items()}, "elapsed_s": time.perf_counter() - started}
            progress.set_postfix(loss=f"{record['train_loss']:.3f}", acc=f"{record['train_accuracy']:.2f}")
            if completed % args.eval_every == 0 or completed == args.max_steps:
                record.update(run.evaluate())
                best_val_loss = save_best_and_last(out_dir, run, completed, record["val_loss"], best_val_loss)
                by_task = ", ".join(f"{name[len('val_accuracy_'):]} {value:.3f}" for name, value in record.items()
                                    if name.startswith("val_accuracy_"))
                progress.write(f"step {completed}: held-out DPO loss {record['val_dpo_loss']:.3f}, preference "
                               f"accuracy {record['val_accuracy']:.3f} ({by_task}), reward margin "
                               f"{record['val_margin']:.3f}, chosen NLL {record['val_chosen_nll']:.3f}/token")
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            if stop.requested or completed == args.stop_at_step:
                status = "interrupted"
                break
        progress.close()
    stop.close()
    signal.signal(signal.SIGTERM, previous_term)
    if status == "interrupted":
        save_checkpoint(out_dir / "last.pt", run.state(completed, best_val_loss))
    return status, completed


def finish(run: PreferenceRun) -> Path:
    """The best checkpoint's adapters alone (adapters.pt) and merged into the model (model.pt)."""
    from llm.lora import save_adapters
    from llm.sft import final_checkpoint, merged_in_float32, restore_trained_state

    best = load_checkpoint(run.out_dir / "best.pt", "DPO", ("step",))
    restore_trained_state(run.model, best)
    if not run.args.full:
        save_adapters(run.out_dir / "adapters.pt", run.model, {"base": run.base, "step": best["step"],
                                                               "merged_before": list(run.args.adapters)})
        # the SFT adapters, then DPO's, folded into the base in float32
        run.model = merged_in_float32(run.args, [*run.args.adapters, run.out_dir / "adapters.pt"])
    state = final_checkpoint(run.model, run.tokenizer, run.args, run.base, run.out_dir,
                             {"step": best["step"], "best_val_loss": best["best_val_loss"]})
    save_checkpoint(run.out_dir / "model.pt", state)
    plot_preferences(run.out_dir / "metrics.jsonl", run.out_dir / "loss.png")
    return run.out_dir / "model.pt"


def plot_preferences(metrics_path: Path, png_path: Path) -> None:
    """The DPO loss (train and held-out) and the held-out preference accuracy against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    train = [(r["step"], r.get("train_dpo_loss", r.get("train_loss"))) for r in rows if "train_loss" in r]
    held = [(r["step"], r.get("val_dpo_loss", r["val_loss"]), r["val_accuracy"]) for r in rows if "val_loss" in r]
    if train:
        left.plot(*zip(*train), linewidth=0.8, alpha=0.8, label="train batch")
    if held:
        steps, losses, accuracies = zip(*held)
        left.plot(steps, losses, "o-", markersize=3, label="held-out pairs")
        right.plot(steps, accuracies, "o-", markersize=3, color="black", label="all")
        tasks = sorted({name for r in rows for name in r if name.startswith("val_accuracy_")})
        for task in tasks:  # each task's pairs alone
            points = [(r["step"], r[task]) for r in rows if task in r]
            right.plot(*zip(*points), "o-", markersize=2, linewidth=0.8, alpha=0.7,
                       label=task[len("val_accuracy_"):])
        if tasks:
            right.legend(fontsize=8)
    left.axhline(math.log(2), color="grey", linestyle=":", linewidth=0.8)
    left.set(xlabel="optimizer step", ylabel="DPO loss", title="loss (dotted: log 2)")
    right.set(xlabel="optimizer step", ylabel="accuracy", title="held-out preference accuracy", ylim=(0, 1))
    left.legend()
    for axis in (left, right):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png_path)
    plt.close(figure)


def main(argv=None):
    from llm.sft import parse_args, stopped_early

    args = parse_args(argv, build_parser, QUICK)
    try:
        run = PreferenceRun(args, argv)
        pairs = run.load_pairs()
        if not args.pairs_only:
            run.prepare(pairs)
        elif not pairs["train"] or not pairs["held_out"]:
            raise ValueError(NO_PAIRS)
        start_step, best_val_loss = (0, float("inf"))
        if run.checkpoint is not None:
            start_step, best_val_loss = run.restore()
        else:
            run.out_dir.mkdir(parents=True, exist_ok=True)
            remove_run_files(run.out_dir, RUN_FILES)  # --overwrite: the old run goes only now
            write_text_atomically(run.out_dir / "pairs.json", json.dumps(pairs, ensure_ascii=False, indent=0))
    except (ValueError, DataError, OSError) as error:
        sys.exit(f"error: {error}")
    if args.pairs_only:
        print(f"wrote {run.out_dir / 'pairs.json'}")
        return
    status, step = preference_loop(run, start_step, best_val_loss)
    if not stopped_early(status, step, args, "llm/dpo.py", "DPO loss"):
        print(f"wrote {finish(run)}")


if __name__ == "__main__":
    main()
