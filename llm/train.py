"""Train the tiny Llama end to end: corpus -> tokenizer -> token files -> training -> validation -> samples.

    python llm/train.py                                    # the default run of the README's results table
    python llm/train.py --quick                            # the same model, fewer steps: about 5 min on 2 cores
    torchrun --nproc_per_node=2 llm/train.py ...           # DistributedDataParallel (gloo on CPU, NCCL on GPU)

Every finished stage of the data pipeline is reused while its inputs are unchanged.
"""

import argparse
import functools
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from llm.generate import StreamPrinter, generate, load_model, pick_device
from llm.model import Llama, LlamaConfig
from llm.prepare import PrepareError, add_hf_dataset_arguments, file_sha256, prepare, read_token_file, source_from_args
from llm.runs import (
    CheckpointError,
    StopFlag,
    changed_setting,
    fraction,
    int_in_range,
    load_checkpoint,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    prepare_run_folder,
    probability,
    remove_run_files,
    save_checkpoint,
    seed_int,
)

# Larger shapes for a GPU (not the default; see the README).
PRESETS = {
    "tinystories-15m": dict(
        dataset="tinystories", vocab_size=4096, d_model=288, n_layers=6, n_heads=6, n_kv_heads=6,
        context_length=256, batch_size=128, grad_accum=4, max_steps=20000, lr=5e-4, warmup_steps=1000, dropout=0.0,
    ),
    "wikitext-gpu": dict(
        dataset="wikitext-2", vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4,
        context_length=512, batch_size=32, grad_accum=2, max_steps=6000, lr=6e-4, warmup_steps=300,
        dropout=0.2, weight_decay=0.1,
    ),
}

# --quick: the default model and batch, with the schedule compressed to fewer steps (warmup and cosine decay
# scaled with it), in a folder of its own so it never meets the default run. A learner's first run.
QUICK = dict(max_steps=800, warmup_steps=50, eval_every=200, out_dir="runs/llm-quick")

# The settings that define a run: a resume takes them from the saved run, and refuses one given anew with
# another value (world_size is the process count; corpus names the tokenized training data).
FIXED_ON_RESUME = (
    "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "context_length", "rope_theta", "dropout",
    "attention_impl", "batch_size", "grad_accum", "world_size", "max_steps", "lr", "min_lr_ratio", "warmup_steps",
    "weight_decay", "beta2", "grad_clip", "eval_every", "eval_batches", "seed", "corpus",
)
SETTING_LABELS = {"world_size": "the process count", "corpus": "the training data (--dataset, --text-file)"}
# Where the data of a run lives: a resume without these flags finds its data where the saved run found it.
DATA_SETTINGS = ("dataset", "text_file", "data_dir", "hf_dataset", "hf_config", "hf_split", "text_column")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="wikitext-2", help="wikitext-2 or tinystories (roneneldan/TinyStories)")
    data.add_argument("--text-file", default=None, help="train on your own UTF-8 text file (split 90/5/5 by lines)")
    data.add_argument("--vocab-size", type=positive_int, default=4096, help="BPE vocabulary size")
    data.add_argument("--data-dir", default="runs/llm/data", help="where tokenizers and token files are kept")
    add_hf_dataset_arguments(parser)
    model = parser.add_argument_group("model")
    model.add_argument("--d-model", type=positive_int, default=192, help="width of the residual stream")
    model.add_argument("--n-layers", type=positive_int, default=4, help="number of transformer blocks")
    model.add_argument("--n-heads", type=positive_int, default=4, help="query heads per layer")
    model.add_argument("--n-kv-heads", type=positive_int, default=2, help="key/value heads (grouped-query attention)")
    model.add_argument("--context-length", type=positive_int, default=128, help="tokens per training sequence")
    model.add_argument("--rope-theta", type=positive_float, default=10000.0, help="RoPE base")
    model.add_argument("--dropout", type=probability, default=0.0, help="dropout on residual branches")
    model.add_argument("--attention-impl", default="torch", choices=["handwritten", "torch"],
                       help="hand-written masked softmax or fused scaled_dot_product_attention")
    train = parser.add_argument_group("training")
    train.add_argument("--preset", default=None, choices=sorted(PRESETS), help="a larger GPU configuration")
    train.add_argument("--quick", action="store_true",
                       help=f"a short run of the default model: {QUICK['max_steps']} steps, warmup "
                            f"{QUICK['warmup_steps']}, validation every {QUICK['eval_every']}, into "
                            f"{QUICK['out_dir']} (about 5 min on 2 CPU cores); flags given beside it win")
    train.add_argument("--batch-size", type=positive_int, default=8, help="sequences per micro-batch (per process)")
    train.add_argument("--grad-accum", type=positive_int, default=1,
                       help="micro-batches accumulated per optimizer step")
    train.add_argument("--max-steps", type=positive_int, default=5000, help="optimizer steps")
    train.add_argument("--lr", type=positive_float, default=3e-3, help="peak learning rate")
    train.add_argument("--min-lr-ratio", type=fraction, default=0.1, help="final learning rate as a fraction of --lr")
    train.add_argument("--warmup-steps", type=non_negative_int, default=100, help="linear warmup steps")
    train.add_argument("--weight-decay", type=non_negative_float, default=0.1,
                       help="AdamW decay on matrices (not norms)")
    train.add_argument("--beta2", type=probability, default=0.99, help="AdamW beta2")
    train.add_argument("--grad-clip", type=non_negative_float, default=1.0,
                       help="clip the global gradient norm (0 = off)")
    train.add_argument("--eval-every", type=positive_int, default=500, help="validation loss every N steps")
    train.add_argument("--eval-batches", type=positive_int, default=32,
                       help="validation loss on this many global batches of windows")
    train.add_argument("--seed", type=seed_int, default=1337, help="random seed")
    train.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    train.add_argument("--threads", type=int_in_range(1, 1024), default=None,
                       help="CPU threads for torch (default: OMP_NUM_THREADS if set, else one per core)")
    train.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="autocast dtype; auto = bf16 on GPUs that support it (else fp16), on a CPU bf16 "
                            "where a timed bf16 matmul is clearly faster than fp32 (else fp32)")
    train.add_argument("--compile", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                       help="torch.compile the model; auto = when a compiler works here and the run is long enough "
                            "to repay compiling (--compile alone = on)")
    train.add_argument("--out-dir", default="runs/llm", help="checkpoints, metrics.jsonl and plots")
    train.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.pt")
    train.add_argument("--overwrite", action="store_true", help="replace the run already in OUT_DIR")
    train.add_argument("--num-samples", type=non_negative_int, default=3, help="samples printed at the end")
    train.add_argument("--sample-tokens", type=positive_int, default=80, help="tokens per sample")
    train.add_argument("--stop-at-step", type=non_negative_int, default=0,
                       help="stop after this step as if interrupted (tests)")
    train.add_argument("--no-final-eval", action="store_true", help="skip the full validation pass at the end")
    return parser


def preset_settings(args) -> dict:
    """The settings that --quick or --preset NAME put in place of the defaults (none without them)."""
    if args.quick and args.preset:
        sys.exit(f"error: --quick and --preset {args.preset} are both presets; pass one")
    return QUICK if args.quick else PRESETS.get(args.preset, {})


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = preset_settings(args)
    if settings:  # a preset replaces the defaults, flags given explicitly still win
        parser.set_defaults(**settings)
        args = parser.parse_args(argv)
    return args


def explicitly_given(argv) -> set:
    """The settings written on the command line, by a flag or by the preset it names (not left at a default)."""
    parser = build_parser()
    for action in parser._actions:  # a flag left out then leaves no attribute at all
        action.default = argparse.SUPPRESS
    given = set(vars(parser.parse_args(argv)))
    return given | set(preset_settings(parse_args(argv)))


def take_saved_settings(args, argv, saved: dict, world_size: int) -> None:
    """A resumed run keeps the settings of the saved run; a setting given anew with another value is refused."""
    given = explicitly_given(argv)
    for name in FIXED_ON_RESUME + DATA_SETTINGS:
        if name in saved and name not in given and hasattr(args, name):
            setattr(args, name, saved[name])
    changed = changed_setting(saved, {**vars(args), "world_size": world_size}, FIXED_ON_RESUME, SETTING_LABELS)
    if changed:
        raise CheckpointError(changed)


def learning_rate(step: int, args) -> float:
    """Eq. 11: linear warmup to the peak, then cosine decay to min_lr_ratio * peak at max_steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    minimum = args.lr * args.min_lr_ratio
    return minimum + 0.5 * (args.lr - minimum) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: Llama, args) -> torch.optim.AdamW:
    """AdamW: weight decay on matrices (and the tied embedding), none on the RMSNorm gains."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type in ("cpu", "cuda")  # one kernel per tensor: measured faster
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), eps=1e-8, fused=fused)


class BatchSampler:
    """Non-overlapping windows of context_length+1 tokens, shuffled once per epoch from (seed, epoch).

    The batch of a step is a pure function of (seed, step), so resuming needs only the step number,
    and rank r of a DDP run takes its slice of the same global batch a single process would draw.
    """

    def __init__(self, tokens: np.ndarray, context_length: int, seed: int):
        self.tokens, self.length, self.seed = tokens, context_length, seed
        self.num_windows = (len(tokens) - 1) // context_length
        if self.num_windows < 1:
            raise ValueError(f"the training split has {len(tokens)} tokens, fewer than one window")
        self._orders = {}

    def order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            self._orders = {epoch: torch.randperm(self.num_windows, generator=generator)}
        return self._orders[epoch]

    def windows(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows number first..first+count-1 of the endless shuffled stream -> inputs, targets (count, T)."""
        rows = []
        for index in range(first, first + count):
            start = int(self.order(index // self.num_windows)[index % self.num_windows]) * self.length
            rows.append(np.asarray(self.tokens[start : start + self.length + 1], dtype=np.int64))
        block = torch.from_numpy(np.stack(rows))  # (count, T+1)
        return block[:, :-1], block[:, 1:]


def evaluation_windows(tokens: np.ndarray, context_length: int, max_windows: int | None = None):
    """Consecutive non-overlapping windows covering a split (for validation/test loss)."""
    count = (len(tokens) - 1) // context_length
    if max_windows is not None:
        count = min(count, max_windows)
    for index in range(count):
        start = index * context_length
        yield torch.from_numpy(np.asarray(tokens[start : start + context_length + 1], dtype=np.int64))


@torch.no_grad()
def evaluate_loss(model, tokens, context_length, batch_size, device, autocast, max_windows=None, rank=0, world_size=1):
    """Mean cross-entropy per token over windows of the split; also the token count.

    Under DDP rank r scores windows r, r + world_size, ... and the sums are added across ranks, so every rank
    gets the loss of the same windows a single process scores.
    """
    model.eval()
    total_loss, total_tokens, pending = 0.0, 0, []

    def flush():
        nonlocal total_loss, total_tokens
        block = torch.stack(pending).to(device)  # (B, T+1)
        with autocast:
            _, loss = model(block[:, :-1], block[:, 1:])
        total_loss += float(loss) * block[:, 1:].numel()
        total_tokens += block[:, 1:].numel()
        pending.clear()

    for index, window in enumerate(evaluation_windows(tokens, context_length, max_windows)):
        if index % world_size != rank:
            continue
        pending.append(window)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    if world_size > 1:
        sums = torch.tensor([total_loss, total_tokens], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        total_loss, total_tokens = float(sums[0]), int(sums[1])
    model.train()
    return total_loss / max(1, total_tokens), total_tokens


def autocast_context(device: torch.device, dtype_name: str):
    """Matrix products in dtype_name under torch.autocast (weights and optimizer stay fp32); fp32 = no autocast."""
    if dtype_name == "float32":
        return nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype_name))


def measure_matmul_peak(device: torch.device, dtype=torch.float32, size: int = 1024, repeats: int = 8) -> float:
    """FLOP/s of the fastest of several large square matmuls: the 'peak' that MFU is measured against.

    The matrices come from a generator of their own: the global one (dropout) stays where a resume put it.
    """
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    best = float("inf")
    for _ in range(repeats + 1):  # the first one is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


BF16_SPEEDUP_NEEDED = 1.3  # on a CPU, bf16 autocast only where its matmul is at least this much faster than fp32


def choose_dtype(device: torch.device, measure=None) -> tuple[str, str]:
    """--dtype auto: the precision to train in, and the measurement behind the choice (one line for the header).

    CUDA: bf16 where the GPU supports it, else fp16 (with a GradScaler). CPU: time a bf16 and an fp32 matmul and
    take bf16 only where it is clearly faster (AVX-512 BF16 or AMX units); without them bf16 is a slow emulation.
    """
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "this GPU supports bf16"
        return "float16", "this GPU has no bf16; fp16 with loss scaling"
    if device.type != "cpu":
        return "float32", f"no bf16 measurement on {device.type}"
    measure = measure or measure_matmul_peak
    with torch.random.fork_rng(devices=[]):  # the measurement never moves the training RNG
        fp32 = measure(device, torch.float32, size=512, repeats=4)
        bf16 = measure(device, torch.bfloat16, size=512, repeats=4)
    choice = "bfloat16" if bf16 >= BF16_SPEEDUP_NEEDED * fp32 else "float32"
    return choice, f"512x512 matmul: bf16 {bf16 / 1e9:.1f} GFLOP/s, fp32 {fp32 / 1e9:.1f} GFLOP/s"


COMPILE_PAYS_OFF_S = 300  # compiling costs about a minute and saves a fraction of every step: worth it past ~5 min


@functools.cache
def compiler_problem(device_type: str) -> str:
    """'' when torch.compile builds and runs a tiny function on this device type, else why not (asked once)."""
    try:
        x = torch.linspace(-1.0, 1.0, 16, device=device_type)
        compiled = torch.compile(lambda t: torch.sin(t) * 2 + 1)
        if not torch.allclose(compiled(x), torch.sin(x) * 2 + 1):
            return "torch.compile computed a test function wrongly"
    except Exception as error:  # noqa: BLE001 - no C++ compiler, a broken toolchain, an unsupported platform
        first_line = (str(error).strip().splitlines() or [""])[0][:100]
        return f"torch.compile cannot build a test function ({type(error).__name__}: {first_line})"
    return ""


@torch.no_grad()
def eager_step_seconds(model, batch_size: int, context_length: int, grad_accum: int, device, autocast) -> float:
    """One training step's seconds without compiling, from a timed forward pass (its backward costs about two)."""
    tokens = torch.zeros(batch_size, context_length, dtype=torch.long, device=device)  # (B, T)
    model.eval()  # no dropout: the estimate draws nothing from the training RNG
    seconds = []
    for _ in range(4):  # the first passes set up kernels: take the fastest
        start = time.perf_counter()
        with autocast:
            model(tokens)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    model.train()
    return 3 * grad_accum * min(seconds)


def decide_compile(mode: str, device, estimated_seconds: float | None) -> tuple[bool, str]:
    """--compile on/off as given; auto compiles when the compiler works and the run is long enough to repay it.

    Returns the choice and the header's words for it: "on (...)" or "off (...)" with the reason in brackets.
    """
    if mode != "auto":
        return mode == "on", f"{mode} (--compile {mode})"
    if estimated_seconds < COMPILE_PAYS_OFF_S:
        return False, (f"off (about {estimated_seconds / 60:.1f} min of eager training: too short to repay "
                       f"compiling; auto compiles runs over {COMPILE_PAYS_OFF_S // 60} min)")
    problem = compiler_problem(device.type)
    if problem:
        return False, f"off ({problem})"
    return True, f"on (about {estimated_seconds / 60:.0f} min of eager training: long enough to repay compiling)"


def plot_curves(metrics_path: Path, png_path: Path):
    """Train and validation loss against step, each at the steps it was really measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        axis.plot(*zip(*train), label="train (per step)", linewidth=0.8, alpha=0.8)
    if val:
        axis.plot(*zip(*val), "o-", label="validation", markersize=3)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("cross-entropy (nats/token)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(png_path)
    plt.close(figure)


def prepare_on_rank_zero(args, distributed: bool, is_main: bool, log):
    """Rank 0 runs (or reuses) the data pipeline; the other ranks wait for it and read what it made."""
    outcome = [None]
    if is_main:
        try:
            hf = source_from_args(args.dataset, args.hf_dataset, args.hf_config, args.hf_split, args.text_column)
            outcome[0] = prepare(args.dataset, args.vocab_size, Path(args.data_dir), args.text_file, log=log, hf=hf)
        except (PrepareError, ValueError, OSError) as error:
            outcome[0] = PrepareError(str(error))
    if distributed:
        dist.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


def main(argv=None):
    args = parse_args(argv)
    if args.threads:  # else OMP_NUM_THREADS, else torch's default: one thread per core
        torch.set_num_threads(args.threads)
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if distributed else (0, 1)
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    out_dir = Path(args.out_dir)
    metrics_path, last_path, best_path = out_dir / "metrics.jsonl", out_dir / "last.pt", out_dir / "best.pt"
    try:
        device = pick_device(args.device)
        # before any work: never start over a run that is there, unless asked to (its files go once this run starts)
        prepare_run_folder(out_dir, args.resume, args.overwrite, remove=False)
        checkpoint = None
        if args.resume:
            checkpoint = load_checkpoint(last_path, "llm", required=("model", "optimizer", "config", "args", "step",
                                                                     "best_val_loss", "rng_cpu"))
            take_saved_settings(args, argv, {**checkpoint["args"], **{key: checkpoint[key] for key in
                                             ("world_size", "corpus") if key in checkpoint}}, world_size)
        if distributed:
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend)
            if device.type == "cuda":
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
                torch.cuda.set_device(device)
        if is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        prepared = prepare_on_rank_zero(args, distributed, is_main, log)
        if checkpoint is not None and checkpoint.get("corpus", prepared.folder.name) != prepared.folder.name:
            raise CheckpointError(changed_setting(checkpoint, {"corpus": prepared.folder.name}, ["corpus"],
                                                  SETTING_LABELS))
        train_tokens = read_token_file(prepared.token_files["train"])
        val_tokens = read_token_file(prepared.token_files["valid"])
        if len(val_tokens) < args.context_length + 1:
            raise ValueError(f"the validation split has {len(val_tokens)} tokens, fewer than one window")
        sampler = BatchSampler(train_tokens, args.context_length, args.seed)
        tokenizer_sha256 = file_sha256(prepared.tokenizer_path)
    except (PrepareError, CheckpointError, ValueError, OSError) as error:
        sys.exit(f"error: {error}")

    torch.manual_seed(args.seed)
    try:
        config = LlamaConfig(
            vocab_size=args.vocab_size, context_length=args.context_length, n_layers=args.n_layers,
            n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, d_model=args.d_model, rope_theta=args.rope_theta,
            dropout=args.dropout, attention_impl=args.attention_impl,
        )
        model = Llama(config).to(device)
    except ValueError as error:
        sys.exit(f"error: {error}")
    except (RuntimeError, MemoryError) as error:  # a shape far too large for this machine
        sys.exit(f"error: the model does not fit in memory ({str(error).strip().splitlines()[0][-120:]})")
    optimizer = make_optimizer(model, args)
    if args.dtype == "auto" and checkpoint is not None and "dtype" in checkpoint:  # a resume keeps its precision
        dtype_name, dtype_reason = checkpoint["dtype"], "the precision of the saved run"
    else:
        dtype_name, dtype_reason = (args.dtype, "--dtype") if args.dtype != "auto" else choose_dtype(device)
    if distributed:  # every rank must train in the precision rank 0 measured
        decision = [dtype_name, dtype_reason]
        dist.broadcast_object_list(decision, src=0)
        dtype_name, dtype_reason = decision
    autocast = autocast_context(device, dtype_name)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype_name == "float16")
    log(f"model: {model.num_parameters():,} parameters ({model.num_parameters(False):,} without the embedding)")

    start_step, best_val_loss, last_saved_step = 0, float("inf"), None
    if checkpoint is not None:
        try:
            if checkpoint["config"] != config.to_dict():
                raise ValueError(f"--resume: {last_path} was trained with another model configuration")
            if checkpoint.get("tokenizer_sha256") != tokenizer_sha256:
                raise ValueError(f"--resume: {last_path} was trained with another tokenizer")
            model.load_state_dict(checkpoint["model"])  # copies the CPU tensors into the model on its device
            optimizer.load_state_dict(checkpoint["optimizer"])
            scaler.load_state_dict(checkpoint.get("scaler", {}) or scaler.state_dict())
            start_step, best_val_loss = int(checkpoint["step"]), float(checkpoint["best_val_loss"])
            torch.set_rng_state(checkpoint["rng_cpu"])
            if device.type == "cuda" and "rng_cuda" in checkpoint:
                torch.cuda.set_rng_state(checkpoint["rng_cuda"], device)
        except (RuntimeError, KeyError, ValueError, TypeError) as error:
            sys.exit(f"error: {last_path} does not fit this run: {str(error).splitlines()[0]}")
        last_saved_step = start_step
        if is_main and metrics_path.exists():  # forget metrics logged after the checkpoint
            kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            temporary = metrics_path.with_name(metrics_path.name + ".tmp")
            temporary.write_text("".join(line + "\n" for line in kept))
            os.replace(temporary, metrics_path)  # a crash here keeps the old file whole
        log(f"resumed from {last_path} at step {start_step}")

    estimated_seconds = None
    if args.compile == "auto":
        remaining_steps = max(0, args.max_steps - start_step)
        estimated_seconds = remaining_steps * eager_step_seconds(model, args.batch_size, args.context_length,
                                                                 args.grad_accum, device, autocast)
    compiled, compile_reason = decide_compile(args.compile, device, estimated_seconds)
    if distributed:  # every rank runs the same way as rank 0
        decision = [compiled, compile_reason]
        dist.broadcast_object_list(decision, src=0)
        compiled, compile_reason = decision
    if compiled and args.compile == "auto":  # should compiling fail after all, train eager rather than stop
        torch._dynamo.config.suppress_errors = True
    train_model = torch.compile(model) if compiled else model
    if distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(train_model)

    def checkpoint_state(step: int) -> dict:
        state = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "config": config.to_dict(), "args": {k: v for k, v in vars(args).items()}, "step": step,
            "best_val_loss": best_val_loss, "rng_cpu": torch.get_rng_state(),
            "tokenizer_path": str(prepared.tokenizer_path.resolve()), "tokenizer_sha256": tokenizer_sha256,
            "world_size": world_size, "corpus": prepared.folder.name, "dtype": dtype_name,
        }
        if device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(device)  # a CPU tensor: it loads on any machine
        return state

    global_batch = args.batch_size * args.grad_accum * world_size
    tokens_per_step = global_batch * args.context_length
    peak_flops = measure_matmul_peak(device, getattr(torch, dtype_name)) if is_main else 1.0  # MFU's reference
    flops_per_token = model.flops_per_token()
    log(f"global batch {global_batch} x {args.context_length} = {tokens_per_step:,} tokens/step; "
        f"{args.max_steps} steps = {args.max_steps * tokens_per_step / max(1, len(train_tokens)):.2f} epochs; "
        f"matmul peak {peak_flops / 1e9:.1f} GFLOP/s in {dtype_name}")
    log(f"dtype {dtype_name} ({dtype_reason})")
    log(f"compile: {compile_reason}")

    stop = StopFlag()
    if is_main and checkpoint is None:
        remove_run_files(out_dir)  # --overwrite (or leftovers of a run that never saved a checkpoint)
    metrics_file = open(metrics_path, "a") if is_main else None
    progress = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps,
                    disable=not is_main, dynamic_ncols=True)
    model.train()
    status, step, diverged = "finished", start_step, ""
    interval_start, interval_tokens = time.perf_counter(), 0
    for step in progress:
        lr = learning_rate(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            first = step * global_batch + (micro * world_size + rank) * args.batch_size
            inputs, targets = sampler.windows(first, args.batch_size)
            inputs, targets = inputs.to(device), targets.to(device)
            # DDP: synchronise gradients only on the last micro-batch of the step
            sync = nullcontext() if not distributed or micro == args.grad_accum - 1 else train_model.no_sync()
            with sync, autocast:
                _, loss = train_model(inputs, targets)
            scaler.scale(loss / args.grad_accum).backward()
            step_loss += loss.detach() / args.grad_accum
        if distributed:
            dist.all_reduce(step_loss)
            step_loss /= world_size
        loss_value = float(step_loss)
        if not math.isfinite(loss_value):
            status, diverged = "diverged", "training"
            break
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        completed = step + 1
        interval_tokens += tokens_per_step
        elapsed = time.perf_counter() - interval_start
        tokens_per_second = interval_tokens / max(elapsed, 1e-9)
        mfu = tokens_per_second * flops_per_token / peak_flops / world_size
        record = {"step": completed, "train_loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                  "tokens_per_s": tokens_per_second, "mfu": mfu}
        if step == start_step:  # the first step compiles (or warms up): its time is not training throughput
            record["first_step_s"] = elapsed
            if compiled:
                progress.write(f"compiled in {elapsed:.0f} s (the first step; tokens/s counts from the second)")
            interval_start, interval_tokens = time.perf_counter(), 0
        progress.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens_per_second:,.0f}",
                             mfu=f"{mfu:.0%}")
        if completed % args.eval_every == 0 or completed == args.max_steps:
            val_loss, _ = evaluate_loss(model, val_tokens, args.context_length, args.batch_size, device, autocast,
                                        args.eval_batches * global_batch, rank, world_size)
            if not math.isfinite(val_loss):
                status, diverged = "diverged", "validation"
                break
            record["val_loss"] = val_loss
            if val_loss < best_val_loss:
                best_val_loss = val_loss
                if is_main:
                    save_checkpoint(best_path, checkpoint_state(completed))
            if is_main:
                save_checkpoint(last_path, checkpoint_state(completed))
                progress.write(f"step {completed}: train {loss_value:.3f}, val {val_loss:.3f}")
            last_saved_step = completed
            interval_start, interval_tokens = time.perf_counter(), 0  # evaluation time is not training time
        if is_main:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        stop_requested = stop.requested
        if distributed:  # every rank stops at the same step, whichever rank the Ctrl-C reached first
            flag = torch.tensor(float(stop_requested), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop_requested = bool(flag.item())
        if stop_requested or completed == args.stop_at_step:
            status = "interrupted"
            break
    progress.close()
    stop.close()
    if is_main:
        metrics_file.close()
    if status == "diverged":
        good = ("no checkpoint was written yet" if last_saved_step is None
                else f"{last_path} (step {last_saved_step}) holds the last good state")
        if is_main:
            sys.stderr.write(f"error: the {diverged} loss is not finite at step {step + 1}; "
                             f"stopped without saving: {good}\n")
        if distributed:
            dist.destroy_process_group()
        sys.exit(1)
    if is_main:
        completed_steps = step + 1 if args.max_steps > start_step else start_step
        save_checkpoint(last_path, checkpoint_state(completed_steps))
        if status == "finished" and not best_path.exists():
            save_checkpoint(best_path, checkpoint_state(completed_steps))
        plot_curves(metrics_path, out_dir / "loss.png")
    if distributed:
        dist.destroy_process_group()
    if not is_main:
        return
    if status == "interrupted":
        print(f"stopped at step {completed_steps}; resume with: python llm/train.py --out-dir {out_dir} --resume")
        return
    finish(args, best_path, prepared, device, out_dir)


def finish(args, best_path, prepared, device, out_dir: Path):
    """Validation and test metrics of the best checkpoint (saved to results.json), then a few samples."""
    import sentencepiece as spm

    from llm.eval import half_context_stride, split_metrics

    model, checkpoint = load_model(str(best_path), device)
    if not args.no_final_eval:
        results = {"step": checkpoint["step"]}
        for split in ("valid", "test"):
            metrics = split_metrics(model, prepared.token_files[split], prepared.text_files[split],
                                    args.context_length, max(args.batch_size, 32), device,
                                    half_context_stride(args.context_length))
            results[split] = metrics
            print(f"{split}: loss {metrics['loss']:.4f} nats/token | {metrics['bits_per_byte']:.4f} bits/byte | "
                  f"word perplexity {metrics['word_perplexity']:.1f}")
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    processor = spm.SentencePieceProcessor(model_file=str(prepared.tokenizer_path))
    generator = torch.Generator().manual_seed(args.seed)
    for sample in range(args.num_samples):
        prompt = ["The", "In 1998", "The game"][sample % 3]
        prompt_ids = processor.encode(prompt)
        print(f"--- sample {sample + 1} ---")
        sys.stdout.write(prompt)
        generate(model, prompt_ids, args.sample_tokens, temperature=0.8, top_p=0.95, eos_id=processor.eos_id(),
                 generator=generator, on_token=StreamPrinter(processor, prompt_ids))
        print()


if __name__ == "__main__":
    main()
