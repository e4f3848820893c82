"""Score a chat model on every held-out task, with the metric the task's own chapter publishes.

    python llm/chat_eval.py                                     # SmolLM2-135M-Instruct as shipped
    python llm/chat_eval.py --adapters runs/sft/adapters.pt     # the same base with fine-tuned LoRA adapters
    python llm/chat_eval.py --checkpoint runs/sft/model.pt      # any model llm/chat.py can load
    python llm/chat_eval.py --json --out results.json           # one JSON object

    translation  BLEU (sacrebleu, one reference per pair) of "Translate to Spanish: ..." on the transformer
                 chapter's test pairs
    surnames     accuracy on the rnn chapter's test names (the first language the answer names is the right one)
    entities     strict entity F1 (seqeval, IOBES) on the gru chapter's test sentences
    chitchat     cross-entropy of the held-out answers (nats per answer token; lower is better)

Each task scores a fixed random sample of its test split (--count TASK=N; the same sample for every model).
Answers are decoded greedily, many prompts at once (padded on the left, with an attention mask that hides the
padding, so each row decodes as it would alone).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from data import DataError
from llm.chat_model import add_model_arguments, load_chat_model
from llm.conversations import encode_examples
from llm.generate import filter_logits
from llm.instructions import TASKS, entity_f1, sample_examples, surname_is_right, tags_from_answer
from llm.model import KVCache
from llm.runs import positive_int
from llm.sft import AnswerLoss, answer_loss, parse_mix

DEFAULT_COUNTS = "translation=200,surnames=300,entities=150,chitchat=100"
MAX_NEW_TOKENS = {"translation": 48, "surnames": 16, "entities": 64}
SAMPLE_SEED = 0


def next_tokens_of(logits: torch.Tensor, temperature: float, generator) -> torch.Tensor:
    """Greedy (temperature 0) or sampled next tokens from the last position's logits (B, V) -> (B,)."""
    if temperature == 0:
        return logits.float().argmax(dim=-1)
    probabilities = filter_logits(logits.float() / temperature, top_p=0.95).softmax(dim=-1)  # (B, V)
    return torch.multinomial(probabilities.cpu(), 1, generator=generator)[:, 0].to(logits.device)


@torch.no_grad()
def generate_batch(model, prompts: list, max_new_tokens: int, stop_ids, temperature: float = 0.0,
                   generator: torch.Generator | None = None) -> list:
    """Answers of several prompts decoded together (greedy, or sampled with nucleus 0.95 at `temperature`).

    The prompts are padded on the left to one length, so every row writes its next token into the same cache
    column. Each row's tokens are rotated by their own positions (0 at its first real token) and an attention mask
    hides the padding from the real tokens: each row computes what it would compute alone.
    """
    device = model.embedding.weight.device
    longest = max(len(prompt) for prompt in prompts)
    steps = min(max_new_tokens, model.rope_cos.size(0) - longest)
    if steps < 1:
        return [[] for _ in prompts]
    pads = torch.tensor([longest - len(prompt) for prompt in prompts], device=device)  # (B,)
    tokens = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=device)  # (B, T)
    columns = torch.arange(longest + steps, device=device)  # cache columns
    real = columns[None, :] >= pads[:, None]  # (B, T + steps): the columns that hold a row's real tokens
    cache = KVCache(model.config, len(prompts), longest + steps, device, model.embedding.weight.dtype)

    def read(new_tokens, first: int):
        """Feed the tokens of cache columns first..first+T-1; return the logits of the last one (B, V)."""
        length = new_tokens.size(1)
        queries = columns[first : first + length]  # (T,)
        allowed = (columns[None, None, : first + length] <= queries[None, :, None]) & \
            (real[:, None, : first + length] | (columns[None, None, : first + length] == queries[None, :, None]))
        positions = (queries[None, :] - pads[:, None]).clamp(min=0)  # (B, T): a pad sees only itself
        logits, _ = model(new_tokens, cache=cache, positions=positions, attention_mask=allowed[:, None])
        return logits[:, -1]

    next_tokens = next_tokens_of(read(tokens, 0), temperature, generator)  # (B,)
    answers, done = [[] for _ in prompts], [False] * len(prompts)
    for step in range(steps):
        for row, token in enumerate(next_tokens.tolist()):
            if not done[row]:
                answers[row].append(token)
                done[row] = token in stop_ids
        if all(done) or step == steps - 1:
            break
        next_tokens = next_tokens_of(read(next_tokens[:, None], longest + step), temperature, generator)
    return [[token for token in answer if token not in stop_ids] for answer in answers]


def answer_all(model, tokenizer, examples, max_new_tokens: int, batch_size: int, progress=None) -> list[str]:
    """The model's greedy answer to every example's question (an empty one where the question outgrows the
    model's context)."""
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(example.messages[:-1], add_generation_prompt=True))
               for example in examples]
    window = model.rope_cos.size(0)
    fits = [i for i, prompt in enumerate(prompts) if len(prompt) < window]  # a longer one gets no answer
    order = sorted(fits, key=lambda i: len(prompts[i]))  # similar lengths: little padding
    answers = [""] * len(examples)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        outputs = generate_batch(model, [prompts[i] for i in chunk], max_new_tokens, set(tokenizer.stop_ids))
        for index, output in zip(chunk, outputs):
            answers[index] = tokenizer.decode(output).strip()
        if progress is not None:
            progress(len(chunk))
    return answers


def score_task(task: str, model, tokenizer, count: int, batch_size: int, log) -> dict:
    """The task's metric on `count` held-out items, with a few examples of the answers."""
    started = time.perf_counter()
    examples = sample_examples(task, "test", count, seed=SAMPLE_SEED)
    if task == "chitchat":
        encoded = encode_examples(tokenizer, examples, min(512, model.rope_cos.size(0)))
        loss = answer_loss(AnswerLoss(model), encoded, batch_size, tokenizer.eos_id() or 0,
                           model.embedding.weight.device, torch.autocast("cpu", enabled=False))
        return {"metric": "answer_loss", "value": round(loss, 4), "count": len(encoded),
                "seconds": round(time.perf_counter() - started, 1)}
    answers = answer_all(model, tokenizer, examples, MAX_NEW_TOKENS[task], batch_size)
    if task == "translation":
        import sacrebleu

        value = sacrebleu.corpus_bleu(answers, [[e.reference for e in examples]]).score
        metric = "bleu"
    elif task == "surnames":
        value = 100 * sum(surname_is_right(a, e.reference) for a, e in zip(answers, examples)) / len(examples)
        metric = "accuracy_percent"
    else:
        predicted = [tags_from_answer(a, e.extra["chars"]) for a, e in zip(answers, examples)]
        value = entity_f1([e.reference for e in examples], predicted)
        metric = "entity_f1"
    shown = [{"question": e.messages[0]["content"], "answer": a, "reference": e.messages[1]["content"]}
             for e, a in list(zip(examples, answers))[:3]]
    return {"metric": metric, "value": round(value, 4), "count": len(examples), "examples": shown,
            "seconds": round(time.perf_counter() - started, 1)}


def load_model(args):
    """The model of the flags with every --adapters file merged into it, in order (in float32, then --dtype)."""
    from llm.chat_model import DTYPES
    from llm.lora import merge_adapter_files

    model, tokenizer = load_chat_model(gguf=args.gguf, hf=args.hf, checkpoint=args.checkpoint,
                                       dtype=torch.float32, notice=lambda message: None)
    merge_adapter_files(model, args.adapters)
    return model.to(DTYPES[args.dtype]).eval(), tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, device=False)
    parser.add_argument("--adapters", action="append", default=[],
                        help="LoRA adapters written by llm/sft.py or llm/dpo.py, merged into the model in the "
                             "order given (repeat: the SFT run's, then the DPO run's on top)")
    parser.add_argument("--count", default=DEFAULT_COUNTS,
                        help=f"held-out items per task, task=N,... (tasks: {', '.join(TASKS)})")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="prompts decoded together")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--out", default=None, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    log = (lambda *a, **k: None) if args.json else print
    try:
        counts = parse_mix(args.count, "--count")
        model, tokenizer = load_model(args)
        results = {}
        for task, count in counts.items():
            if count:
                results[task] = score_task(task, model, tokenizer, count, args.batch_size, log)
                log(f"{task:12s} {results[task]['metric']:17s} {results[task]['value']:8.4f}  "
                    f"({results[task]['count']} held-out items, {results[task]['seconds']} s)")
    except (ValueError, DataError, OSError) as error:
        sys.exit(f"error: {error}")
    report = {"model": args.checkpoint or args.gguf or args.hf or "SmolLM2-135M-Instruct", "adapters": args.adapters,
              "dtype": args.dtype, "threads": torch.get_num_threads(), "tasks": results}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, ensure_ascii=False))
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return
    for task, result in results.items():
        for shown in result.get("examples", []):
            print(f"[{task}] {shown['question'][:70]!r} -> {shown['answer'][:70]!r} (reference "
                  f"{shown['reference'][:50]!r})")


if __name__ == "__main__":
    main()
