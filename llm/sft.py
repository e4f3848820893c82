"""Supervised fine-tuning: teach a model to answer by showing it conversations, learning only from the answers.

    python llm/sft.py                              # LoRA on SmolLM2-135M-Instruct, 400 steps: the README's run,
                                                   # 18-19 min on 2 cores (AMD EPYC, bf16)
    python llm/sft.py --quick                      # the same steps on fewer examples: 4 min 30 s on 2 cores
    python llm/sft.py --full                       # every weight trains instead of adapters
    python llm/sft.py --checkpoint runs/llm/best.pt --full   # a model pretrained by llm/train.py learns to chat
    python llm/sft.py --hf-dataset HuggingFaceH4/no_robots   # any chat dataset `datasets` can open
    torchrun --nproc_per_node=2 llm/sft.py ...     # DistributedDataParallel (gloo on CPU, NCCL on GPU)

The run writes into --out-dir: last.pt and best.pt (for --resume; with LoRA they hold the adapters alone),
metrics.jsonl, loss.png, and at the end adapters.pt (LoRA) and model.pt, the fine-tuned model with its adapters
merged into the weights, which llm/chat.py, llm/serve.py and llm/chat_eval.py load with --checkpoint.
"""

import argparse
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import DataError
from llm.chat_model import add_model_arguments, load_chat_model
from llm.conversations import LengthBuckets, collate, encode_examples, grow_vocabulary, sentencepiece_chat_tokenizer
from llm.instructions import TASKS, hf_examples, sample_examples, training_mixture
from llm.lora import adapter_state_dict, add_lora, num_adapter_parameters, parse_targets
from llm.prepare import file_sha256
from llm.runs import (
    EXIT_INTERRUPTED,
    CheckpointError,
    StopFlag,
    check_run_folder,
    fraction,
    load_checkpoint,
    non_negative_float,
    non_negative_int,
    pick_device,
    positive_float,
    positive_int,
    probability,
    refuse_changed_settings,
    remove_run_files,
    restore_rng_states,
    rng_states,
    save_checkpoint,
    seed_int,
    warn_if_threads_changed,
    write_text_atomically,
)
from llm.train import learning_rate, plot_curves  # warmup, then cosine decay to min_lr_ratio * lr

RUN_FILES = ("last.pt", "best.pt", "*.tmp", "metrics.jsonl", "loss.png", "adapters.pt", "model.pt", "results.json",
             "tokenizer.model")
DEFAULT_MIX = "translation=3200,surnames=1200,entities=1600,chitchat=600"
PAD_TO = 16  # the default --pad-to
# --quick: the same recipe on fewer examples and steps, in a folder of its own
QUICK_HELP = ("the same recipe on fewer examples, 120 steps, into runs/sft-quick (measured: 4 min 30 s on 2 threads "
              "of a 2-core AMD EPYC)")
QUICK = dict(mix="translation=600,surnames=400,entities=300,chitchat=200", max_steps=120, eval_every=40,
             eval_examples=12, out_dir="runs/sft-quick")
# The settings that define a run: a resume keeps them, and refuses one given anew with another value.
FIXED_ON_RESUME = ("gguf", "hf", "checkpoint", "dtype", "mix", "hf_dataset", "hf_config", "hf_split", "hf_limit",
                   "max_length", "pad_to", "full", "lora_rank", "lora_alpha", "lora_targets", "lora_dropout",
                   "batch_size", "grad_accum", "max_steps", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
                   "grad_clip", "eval_every", "eval_examples", "seed", "world_size")


def lora_targets(text: str) -> str:
    """An argparse type: the --lora-targets text, checked (it is kept as written, for the run's settings)."""
    try:
        parse_targets(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def add_training_arguments(parser: argparse.ArgumentParser, defaults: dict) -> None:
    """The flags sft.py and dpo.py share: adapters, the optimizer and its schedule, the run folder."""
    lora = parser.add_argument_group("LoRA (the default) or full fine-tuning")
    lora.add_argument("--full", action="store_true", help="train every weight instead of LoRA adapters")
    lora.add_argument("--lora-rank", type=positive_int, default=8, help="rank r of every adapter")
    lora.add_argument("--lora-alpha", type=positive_float, default=16.0, help="the update is scaled by alpha / r")
    lora.add_argument("--lora-targets", default="all", type=lora_targets,
                      help="projections that get adapters: all, or a comma list of q,k,v,o,gate,up,down")
    lora.add_argument("--lora-dropout", type=probability, default=0.0, help="dropout on the adapters' input")
    train = parser.add_argument_group("training")
    train.add_argument("--batch-size", type=positive_int, default=8, help="conversations per micro-batch (per process)")
    train.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    train.add_argument("--max-steps", type=positive_int, default=defaults["max_steps"], help="optimizer steps")
    train.add_argument("--lr", type=positive_float, default=None,
                       help=f"peak learning rate (default {defaults['lr_lora']} with LoRA, {defaults['lr_full']} "
                            f"with --full)")
    train.add_argument("--min-lr-ratio", type=fraction, default=0.1, help="final learning rate as a fraction of --lr")
    train.add_argument("--warmup-steps", type=non_negative_int, default=defaults["warmup_steps"],
                       help="linear warmup steps")
    train.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="AdamW weight decay on matrices")
    train.add_argument("--grad-clip", type=non_negative_float, default=1.0, help="clip the gradient norm (0 = off)")
    train.add_argument("--eval-every", type=positive_int, default=defaults["eval_every"],
                       help="held-out evaluation every N steps")
    train.add_argument("--seed", type=seed_int, default=0, help="seed of the data sample, adapters and batch order")
    train.add_argument("--out-dir", default=defaults["out_dir"], help="checkpoints, metrics.jsonl, plots, the model")
    train.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its last.pt")
    train.add_argument("--overwrite", action="store_true", help="replace the run already in --out-dir")
    train.add_argument("--quick", action="store_true", help=defaults["quick_help"])
    train.add_argument("--stop-at-step", type=non_negative_int, default=0,
                       help=argparse.SUPPRESS)  # tests: stop after this step as if interrupted


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    # a LoRA base in bf16: half the bytes to read per step, and bf16 matmuls where the CPU has them (the adapters
    # and the optimizer stay float32); with --full the weights stay float32 and bf16 is autocast
    parser.set_defaults(dtype="bfloat16")
    data = parser.add_argument_group("data")
    data.add_argument("--mix", default=DEFAULT_MIX,
                      help=f"training conversations per task, task=count,... (tasks: {', '.join(TASKS)})")
    data.add_argument("--hf-dataset", default=None,
                      help="also train on a chat dataset `datasets` can open (messages or conversations column)")
    data.add_argument("--hf-config", default=None, help="the configuration of --hf-dataset")
    data.add_argument("--hf-split", default="train", help="the split of --hf-dataset to train on")
    data.add_argument("--hf-limit", type=positive_int, default=None, help="use at most this many of its conversations")
    data.add_argument("--max-length", type=positive_int, default=384, help="tokens per conversation (longer: cut)")
    data.add_argument("--pad-to", type=positive_int, default=PAD_TO,
                      help="pad each batch's length up to a multiple of this (1 = to its longest conversation): a "
                           "few batch shapes keep the process's memory from growing with every new length")
    data.add_argument("--eval-examples", type=positive_int, default=24,
                      help="held-out conversations per task for the validation loss (from each task's valid split)")
    add_training_arguments(parser, dict(max_steps=400, lr_lora=1e-3, lr_full=5e-5, warmup_steps=30, eval_every=100,
                                        out_dir="runs/sft", quick_help=QUICK_HELP))
    return parser


def parse_args(argv=None, build=build_parser, quick=QUICK):
    parser = build()
    args = parser.parse_args(argv)
    if args.quick:  # the quick settings replace the defaults; flags given explicitly still win
        parser.set_defaults(**quick)
        args = parser.parse_args(argv)
    return args


def explicitly_given(argv, build=build_parser, quick=QUICK) -> set:
    """The settings named on the command line (or by --quick), not left at a default."""
    parser = build()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given = set(vars(parser.parse_args(argv)))
    return given | (set(quick) if "quick" in given else set())


def parse_mix(text: str, flag: str = "--mix") -> dict:
    """'translation=100,surnames=50' -> {'translation': 100, 'surnames': 50}; ValueError naming what is wrong."""
    mix = {}
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        task, _, count = part.partition("=")
        if task.strip() not in TASKS or not count.strip().isdigit():
            raise ValueError(f"{flag} takes task=count pairs with tasks {', '.join(TASKS)}, not {part!r}")
        mix[task.strip()] = int(count)
    return mix


# ---------------------------------------------------------------------------------------------- the base model


def base_record(args) -> dict:
    """Which base model a run starts from, with its file's sha256: a resume and a merge check it is the same."""
    from llm.chat_model import default_model_path

    kind, source = next(((kind, getattr(args, kind)) for kind in ("gguf", "hf", "checkpoint")
                         if getattr(args, kind)), ("gguf", None))
    path = Path(source) if source is not None else default_model_path()
    record = {"kind": kind, "path": str(path.resolve()) if path.exists() else str(source)}
    if path.is_file():
        record["sha256"] = file_sha256(path)
    return record


def load_base(args, log=print):
    """(model, tokenizer, grown): the base in float32 (bf16 for a LoRA base with --dtype bfloat16).

    A model pretrained here has no chat tokens: its SentencePiece vocabulary gains <|im_start|> and <|im_end|>
    (the caller writes it to OUT_DIR/tokenizer.model), and its embedding gains rows for them (`grown` counts them).
    """
    dtype = torch.bfloat16 if args.dtype == "bfloat16" and not args.full else torch.float32
    model, tokenizer = load_chat_model(gguf=args.gguf, hf=args.hf, checkpoint=args.checkpoint, dtype=dtype,
                                       notice=lambda message: None)
    grown = 0
    if args.checkpoint:
        saved = load_checkpoint(Path(args.checkpoint), "llm", ("model", "config"))
        if not saved.get("chat_template"):  # a base model of llm/train.py
            tokenizer = sentencepiece_chat_tokenizer(Path(saved["tokenizer_path"]).read_bytes())
            grown = grow_vocabulary(model, tokenizer.vocab_size)
            log(f"the vocabulary gains the chat tokens <|im_start|> and <|im_end|> (ids {tokenizer.vocab_size - 2} "
                f"and {tokenizer.vocab_size - 1}); their embedding rows start as the mean of the others")
    if grown and not args.full:
        raise ValueError("this model's vocabulary grows by the chat tokens, whose embedding rows must be trained: "
                         "pass --full (the chapter's small models gain nothing from LoRA)")
    return model.train(), tokenizer, grown


def attach_adapters(model, args) -> list:
    """LoRA adapters on a frozen base, or every weight trainable (--full); returns the trainable parameters."""
    if not args.full:
        add_lora(model, args.lora_rank, args.lora_alpha, parse_targets(args.lora_targets), args.lora_dropout)
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


# ---------------------------------------------------------------------------------------------- data and loss


def training_examples(args) -> list:
    """The mixture of --mix (train splits only) plus --hf-dataset's conversations."""
    examples = training_mixture(parse_mix(args.mix), args.seed)
    if args.hf_dataset:
        examples += hf_examples(args.hf_dataset, args.hf_config, args.hf_split, args.hf_limit)
    if not examples:
        raise ValueError("no training conversations: give --mix counts or --hf-dataset")
    return examples


def validation_sets(args, tokenizer, max_length: int) -> dict:
    """Per task, --eval-examples conversations of its valid split (never trained on), encoded."""
    tasks = [task for task, count in parse_mix(args.mix).items() if count]
    return {task: encode_examples(tokenizer, sample_examples(task, "valid", args.eval_examples, seed=1), max_length)
            for task in tasks}


class AnswerLoss(nn.Module):
    """The summed cross-entropy of the answer tokens of a batch, with logits computed at those positions only.

    The output layer of SmolLM2 (576 x 49,152) is a fifth of the model's multiply-adds per token; the prompt's
    positions need none of it, since nothing is learnt there.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs, targets, mask):
        logits = answer_logits(self.model, inputs, mask)  # (N, V)
        return F.cross_entropy(logits.float(), targets[mask], reduction="sum")


def answer_logits(model, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Llama.forward, with the output layer applied at the masked positions only: (B, T) -> (N, V)."""
    length = inputs.size(1)
    cos, sin = model.rope_cos[:length], model.rope_sin[:length]  # (T, head_dim/2)
    hidden = model.dropout(model.embedding(inputs))  # (B, T, d_model)
    for block in model.blocks:
        hidden = block(hidden, cos, sin)
    answers = model.final_norm(hidden)[mask]  # (N, d_model): the N answer positions of the batch
    weight = model.embedding.weight if model.output_proj is None else model.output_proj.weight  # (V, d_model)
    return F.linear(answers, weight)  # (N, V)


@torch.no_grad()
def answer_loss(loss_module, encoded, batch_size: int, pad_id: int, device, autocast, pad_to: int = 1) -> float:
    """Mean cross-entropy per answer token over a set of conversations (nats/token); batches padded to a
    multiple of pad_to tokens."""
    loss_module.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # similar lengths together
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        inputs, targets, mask = collate(encoded, order[start : start + batch_size], pad_id, pad_to)
        with autocast:
            total += float(loss_module(inputs.to(device), targets.to(device), mask.to(device)))
        count += int(mask.sum())
    loss_module.train()
    return total / max(1, count)


def make_optimizer(parameters: list, args) -> torch.optim.AdamW:
    decay = [p for p in parameters if p.dim() >= 2]
    no_decay = [p for p in parameters if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([group for group in groups if group["params"]], lr=args.lr, betas=(0.9, 0.999))


def autocast_for(args, device):
    """bf16 autocast for full fine-tuning with --dtype bfloat16 (the weights and AdamW stay float32)."""
    if args.full and args.dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


# ---------------------------------------------------------------------------------------------- checkpoints


def trained_state(model, args) -> dict:
    """What a run's checkpoints keep of the model: the adapters alone, or (--full) every weight."""
    if args.full:
        return {"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
    return {"adapters": adapter_state_dict(model), "lora": dict(model.lora)}


def restore_trained_state(model, checkpoint: dict) -> None:
    if "adapters" in checkpoint:
        model.load_state_dict(checkpoint["adapters"], strict=False)
    else:
        model.load_state_dict(checkpoint["model"])


def final_checkpoint(model, tokenizer, args, base: dict, out_dir: Path, extra: dict) -> dict:
    """The merged model in llm/train.py's checkpoint format, with the chat template and where its tokenizer is."""
    state = {"model": {k: v.detach().float().cpu() for k, v in model.state_dict().items()},
             "config": model.config.to_dict(), "chat_template": tokenizer.chat_template, "base": base,
             "args": {k: v for k, v in vars(args).items()}, **extra}
    if extra.get("grown"):  # a model of this chapter, its vocabulary grown
        state["tokenizer_path"] = str((out_dir / "tokenizer.model").resolve())
        state["tokenizer_sha256"] = file_sha256(out_dir / "tokenizer.model")
    elif base["kind"] == "checkpoint":
        saved = load_checkpoint(Path(base["path"]), "llm", ("model", "config"))
        state["tokenizer_path"], state["tokenizer_sha256"] = saved.get("tokenizer_path"), saved.get("tokenizer_sha256")
    elif base["kind"] == "gguf":
        state["tokenizer_gguf"], state["tokenizer_gguf_sha256"] = base["path"], base.get("sha256")
    else:
        state["tokenizer_hf"] = base["path"]
    return state


def take_saved_settings(args, argv, saved: dict, world_size: int, build=build_parser, quick=QUICK,
                        fixed=FIXED_ON_RESUME) -> None:
    """A resumed run keeps the saved run's settings (`fixed`); one given anew with another value is refused."""
    given = explicitly_given(argv, build, quick)
    for name in fixed:
        if name in saved and name not in given and hasattr(args, name):
            setattr(args, name, saved[name])
    refuse_changed_settings(saved, {**vars(args), "world_size": world_size}, fixed,
                            {"world_size": "the process count"})


# ---------------------------------------------------------------------------------------------- the run


class Run:
    """Everything one fine-tuning run holds: the model and its loss, the data, the optimizer, where it writes."""

    def __init__(self, args, argv, log=print):
        self.args, self.log = args, log
        self.distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
        self.rank = int(os.environ.get("RANK", 0)) if self.distributed else 0
        self.world_size = int(os.environ["WORLD_SIZE"]) if self.distributed else 1
        self.is_main = self.rank == 0
        self.out_dir = Path(args.out_dir)
        self.device = pick_device(args.device)
        check_run_folder(self.out_dir, args.resume, args.overwrite)
        if self.distributed:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        self.checkpoint = None
        if args.resume:
            self.checkpoint = load_checkpoint(self.out_dir / "last.pt", "fine-tuning",
                                              ("args", "step", "optimizer", "rng", "base"))
            take_saved_settings(args, argv, {**self.checkpoint["args"], "world_size": self.checkpoint.get(
                "world_size", 1)}, self.world_size)
        if args.lr is None:
            args.lr = 5e-5 if args.full else 1e-3
        self.base = base_record(args)
        if self.checkpoint is not None and self.checkpoint["base"].get("sha256") != self.base.get("sha256"):
            raise CheckpointError(f"--resume: {self.out_dir / 'last.pt'} was trained from another base model file")
        self.model, self.tokenizer, self.grown = load_base(args, log)
        self.model.to(self.device)
        self.pad_id = self.tokenizer.eos_id() if self.tokenizer.eos_id() is not None else 0
        self.max_length = min(args.max_length, self.model.rope_cos.size(0))
        self.autocast = autocast_for(args, self.device)

    def load_data(self, examples, valid: dict):
        """Encode the training conversations and the validation sets; the batches of every step follow."""
        self.encoded = encode_examples(self.tokenizer, examples, self.max_length)
        self.valid = valid
        self.global_rows = self.args.batch_size * self.args.grad_accum * self.world_size
        self.buckets = LengthBuckets([len(ids) for ids, _ in self.encoded], self.global_rows, self.args.seed)
        answer_tokens = sum(sum(mask[1:]) for _, mask in self.encoded)
        self.log(f"{len(self.encoded):,} training conversations ({answer_tokens:,} answer tokens, "
                 f"{sum(len(ids) for ids, _ in self.encoded):,} tokens); {self.buckets.batches_per_epoch} batches "
                 f"of {self.global_rows} per epoch; validation: "
                 + ", ".join(f"{task} {len(items)}" for task, items in valid.items()))

    def build_training(self, trainable: list):
        self.trainable = trainable
        self.optimizer = make_optimizer(trainable, self.args)
        self.loss_module = AnswerLoss(self.model)
        self.train_module = self.loss_module
        if self.distributed:
            self.train_module = nn.parallel.DistributedDataParallel(self.loss_module)

    def state(self, step: int, best_val_loss: float) -> dict:
        return {**trained_state(self.model, self.args), "optimizer": self.optimizer.state_dict(), "step": step,
                "best_val_loss": best_val_loss, "rng": rng_states(), "args": dict(vars(self.args)),
                "base": self.base, "base_config": self.model.config.to_dict(), "world_size": self.world_size,
                "threads": torch.get_num_threads(), "grown": self.grown}

    def restore(self) -> tuple[int, float]:
        """Put a --resume checkpoint back: trained weights, optimizer, random state; drop metrics logged later."""
        checkpoint = self.checkpoint
        try:
            restore_trained_state(self.model, checkpoint)
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        except (RuntimeError, KeyError, ValueError) as error:
            raise CheckpointError(f"{self.out_dir / 'last.pt'} does not fit this run: "
                                  f"{str(error).splitlines()[0][:200]}") from None
        restore_rng_states(checkpoint["rng"])
        warn_if_threads_changed(checkpoint.get("threads"))
        step = int(checkpoint["step"])
        metrics = self.out_dir / "metrics.jsonl"
        if self.is_main and metrics.exists():
            kept = [line for line in metrics.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            write_text_atomically(metrics, "".join(line + "\n" for line in kept))
        self.log(f"resumed from {self.out_dir / 'last.pt'} at step {step}")
        return step, float(checkpoint["best_val_loss"])

    def validation(self) -> dict:
        """Held-out answer loss per task and their mean (the number best.pt is chosen by)."""
        losses = {task: answer_loss(self.loss_module, encoded, self.args.batch_size, self.pad_id, self.device,
                                    self.autocast, self.args.pad_to) for task, encoded in self.valid.items()}
        record = {f"val_loss_{task}": loss for task, loss in losses.items()}
        record["val_loss"] = sum(losses.values()) / max(1, len(losses))
        return record

    def micro_batches(self, step: int):
        """The micro-batches of this rank at this step, and the answer tokens of the whole global batch."""
        indices = self.buckets.batch(step)
        answer_tokens = sum(sum(self.encoded[i][1][1:]) for i in indices)
        size = self.args.batch_size
        batches = []
        for micro in range(self.args.grad_accum):
            first = (micro * self.world_size + self.rank) * size
            batches.append(collate(self.encoded, indices[first : first + size], self.pad_id, self.args.pad_to))
        return batches, answer_tokens


def train_step(run: Run, step: int) -> tuple[float, float, int]:
    """One optimizer step; returns the mean answer loss of the global batch, the gradient norm and tokens read.

    Every answer token of the global batch weighs the same, however the rows fall into micro-batches and
    processes: each micro-batch's summed loss is divided by the answer tokens of the whole global batch
    (and multiplied by the process count, which DistributedDataParallel's gradient average divides out).
    """
    args = run.args
    learning = learning_rate(step, args)
    for group in run.optimizer.param_groups:
        group["lr"] = learning
    batches, answer_tokens = run.micro_batches(step)
    summed, tokens = torch.zeros((), device=run.device), 0
    for micro, (inputs, targets, mask) in enumerate(batches):
        last = micro == len(batches) - 1
        sync = nullcontext() if not run.distributed or last else run.train_module.no_sync()
        with sync, run.autocast:
            loss_sum = run.train_module(inputs.to(run.device), targets.to(run.device), mask.to(run.device))
        (loss_sum * run.world_size / answer_tokens).backward()
        summed += loss_sum.detach()
        tokens += int((inputs != run.pad_id).sum()) + len(inputs)
    if run.distributed:
        dist.all_reduce(summed)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable, args.grad_clip or float("inf"))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return float(summed) / answer_tokens, float(grad_norm), tokens * run.world_size


def train_loop(run: Run, start_step: int, best_val_loss: float) -> tuple[str, int]:
    """Steps from start_step to --max-steps with evaluation, checkpoints and Ctrl-C; returns (status, last step)."""
    args, out_dir = run.args, run.out_dir
    stop = StopFlag()
    # a SIGTERM (how a job scheduler or `kill` stops a run) is taken as a Ctrl-C: save at the step boundary
    previous_term = signal.signal(signal.SIGTERM, lambda signum, frame: setattr(stop, "requested", True))
    metrics = open(out_dir / "metrics.jsonl", "a") if run.is_main else None
    progress = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps,
                    disable=not run.is_main, dynamic_ncols=True)
    status, completed, started = "finished", start_step, time.perf_counter()
    seen_tokens = 0
    for step in progress:
        loss, grad_norm, tokens = train_step(run, step)
        if not math.isfinite(loss):
            status = "diverged"
            break
        completed, seen_tokens = step + 1, seen_tokens + tokens
        elapsed = time.perf_counter() - started
        record = {"step": completed, "train_loss": loss, "lr": learning_rate(step, args), "grad_norm": grad_norm,
                  "tokens_per_s": seen_tokens / max(elapsed, 1e-9), "elapsed_s": elapsed}
        progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
        if completed % args.eval_every == 0 or completed == args.max_steps:
            if run.is_main:
                record.update(run.validation())
                best_val_loss = save_best_and_last(out_dir, run, completed, record["val_loss"], best_val_loss)
                progress.write(f"step {completed}: train {loss:.3f}, held-out answers {record['val_loss']:.3f} "
                               f"(" + ", ".join(f"{k[9:]} {v:.3f}" for k, v in record.items()
                                                if k.startswith("val_loss_")) + ")")
            started, seen_tokens = time.perf_counter(), 0  # evaluation time is not training time
        if run.is_main:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        if stop_requested(run, stop) or completed == args.stop_at_step:
            status = "interrupted"
            break
    progress.close()
    stop.close()
    signal.signal(signal.SIGTERM, previous_term)
    if metrics:
        metrics.close()
    if status == "diverged":
        return status, step + 1
    if run.is_main and status == "interrupted":
        save_checkpoint(out_dir / "last.pt", run.state(completed, best_val_loss))
    return status, completed


def stop_requested(run: Run, stop: StopFlag) -> bool:
    """Ctrl-C reached this process, or (DDP) any process: every rank stops at the same step."""
    requested = stop.requested
    if run.distributed:
        flag = torch.tensor(float(requested), device=run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        requested = bool(flag.item())
    return requested


def merged_in_float32(args, adapter_files: list):
    """The base model loaded anew in float32 with each adapter file folded in, in order: the fine-tuned model.

    The adapters trained on a bf16 copy of the base; folded into bf16 weights, W + (alpha / r) B A would be rounded
    to bf16 and most of the update lost (see lora.merge_lora). In float32 the merged model computes what the base
    in float32 with its adapters computes (what chat_eval.py --adapters scores), to float32 rounding.
    """
    from llm.lora import merge_adapter_files

    model, _ = load_chat_model(gguf=args.gguf, hf=args.hf, checkpoint=args.checkpoint, dtype=torch.float32,
                               notice=lambda message: None)
    return merge_adapter_files(model, adapter_files)


def finish(run: Run) -> Path:
    """The best checkpoint's weights, merged: adapters.pt (LoRA) and model.pt for chat, serving and evaluation."""
    from llm.lora import save_adapters

    best = load_checkpoint(run.out_dir / "best.pt", "fine-tuning", ("step",))
    restore_trained_state(run.model, best)
    if not run.args.full:
        save_adapters(run.out_dir / "adapters.pt", run.model, {"base": run.base, "step": best["step"]})
        run.model = merged_in_float32(run.args, [run.out_dir / "adapters.pt"])
    extra = {"step": best["step"], "best_val_loss": best["best_val_loss"], "grown": run.grown}
    state = final_checkpoint(run.model, run.tokenizer, run.args, run.base, run.out_dir, extra)
    save_checkpoint(run.out_dir / "model.pt", state)
    plot_curves(run.out_dir / "metrics.jsonl", run.out_dir / "loss.png")
    return run.out_dir / "model.pt"


def start(args, argv, log) -> Run:
    """Load the base, the data and (on --resume) the saved run; clear an old run's files once all of that worked."""
    run = Run(args, argv, log)
    torch.manual_seed(args.seed)  # the adapters' random A
    run.load_data(training_examples(args), validation_sets(args, run.tokenizer, run.max_length))
    run.build_training(attach_adapters(run.model, args))
    trainable = sum(parameter.numel() for parameter in run.trainable)
    base_size = run.model.num_parameters() - (0 if args.full else trainable)
    what = f"LoRA rank {args.lora_rank} on {args.lora_targets}" if not args.full else "full fine-tuning"
    log(f"{what}: {trainable:,} trainable parameters (the base model has {base_size:,})"
        + (f" ({num_adapter_parameters(run.model) * 4 / 1e6:.1f} MB of adapters)" if not args.full else ""))
    return run


def main(argv=None):
    args = parse_args(argv)
    log = print if int(os.environ.get("RANK", 0)) == 0 else (lambda *a, **k: None)
    try:
        run = start(args, argv, log)
        start_step, best_val_loss = (0, float("inf"))
        if run.checkpoint is not None:
            start_step, best_val_loss = run.restore()
        elif run.is_main:
            remove_run_files(run.out_dir, RUN_FILES)  # --overwrite: the old run goes only now that this one starts
        if run.is_main:
            run.out_dir.mkdir(parents=True, exist_ok=True)
        if run.is_main and run.grown:
            (run.out_dir / "tokenizer.model").write_bytes(run.tokenizer.processor.serialized_model_proto())
    except (ValueError, DataError, OSError) as error:
        sys.exit(f"error: {error}")
    status, step = train_loop(run, start_step, best_val_loss)
    if run.distributed:
        dist.destroy_process_group()
    if not run.is_main:
        return
    if stopped_early(status, step, args, "llm/sft.py", "training loss"):
        return
    print(f"wrote {finish(run)} (chat with it: python llm/chat.py --checkpoint {run.out_dir / 'model.pt'})")


def save_best_and_last(out_dir: Path, run, completed: int, val_loss: float, best_val_loss: float) -> float:
    """Write last.pt, and best.pt first when `val_loss` beats the best so far; the best held-out loss after it."""
    if val_loss < best_val_loss:
        best_val_loss = val_loss
        save_checkpoint(out_dir / "best.pt", run.state(completed, best_val_loss))
    save_checkpoint(out_dir / "last.pt", run.state(completed, best_val_loss))
    return best_val_loss


def stopped_early(status: str, step: int, args, script: str, what: str) -> bool:
    """End a run that did not finish: one line and exit 1 when `what` was not finite, the resume command and exit
    130 (as Ctrl-C) when interrupted, or a normal return at --stop-at-step. False for a finished run."""
    out_dir = Path(args.out_dir)
    if status == "diverged":
        kept = "last.pt holds the last good state" if (out_dir / "last.pt").exists() else "nothing was saved"
        sys.exit(f"error: the {what} is not finite at step {step}; stopped ({kept})")
    if status == "interrupted":
        print(f"stopped at step {step}; resume with: python {script} --out-dir {out_dir} --resume")
        if step != args.stop_at_step:
            sys.exit(EXIT_INTERRUPTED)
        return True
    return False


if __name__ == "__main__":
    main()
