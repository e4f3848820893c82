"""Train the tiny Llama end to end: corpus -> tokenizer -> token files -> training -> validation -> samples.

    python llm/train.py                                    # the default run of the README's results table
    python llm/train.py --quick                            # the same model, fewer steps: about 3 min on 2 cores
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from llm.checkpoint import (
    SETTING_LABELS,
    TRAINING_FIELDS,
    load_model,
    restore_training_state,
    saved_settings,
    take_saved_settings,
    training_state,
)
from llm.generate import StreamPrinter, generate
from llm.model import Llama, LlamaConfig
from llm.prepare import PrepareError, add_hf_dataset_arguments, file_sha256, prepare, read_token_file, source_from_args
from llm.runs import (
    EXIT_INTERRUPTED,
    CheckpointError,
    RunError,
    StopFlag,
    check_run_folder,
    fraction,
    int_in_range,
    load_checkpoint,
    non_negative_float,
    non_negative_int,
    pick_device,
    positive_float,
    positive_int,
    probability,
    refuse_changed_settings,
    remove_run_files,
    save_checkpoint,
    seed_int,
    warn_if_threads_changed,
    write_text_atomically,
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
# The files a training run writes into its --out-dir (--overwrite removes exactly these; the data folder stays).
RUN_FILES = ("last.pt", "best.pt", "last.pt.tmp", "best.pt.tmp", "metrics.jsonl", "metrics.jsonl.tmp", "loss.png",
             "results.json")

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
    model.add_argument("--attention-impl", default="auto", choices=["auto", "handwritten", "fused"],
                       help="hand-written masked softmax (Eq. 6) or torch's fused scaled_dot_product_attention; "
                            "auto = hand-written when the model is compiled on a CPU (the compiler fuses it into "
                            "one loop that is faster there), fused otherwise")
    train = parser.add_argument_group("training")
    train.add_argument("--preset", default=None, choices=sorted(PRESETS), help="a larger GPU configuration")
    train.add_argument("--quick", action="store_true",
                       help=f"a short run of the default model: {QUICK['max_steps']} steps, warmup "
                            f"{QUICK['warmup_steps']}, validation every {QUICK['eval_every']}, into "
                            f"{QUICK['out_dir']} (about 3 min on 2 CPU cores); flags given beside it win")
    train.add_argument("--batch-size", type=positive_int, default=8, help="sequences per micro-batch (per process)")
    train.add_argument("--grad-accum", type=positive_int, default=1,
                       help="micro-batches accumulated per optimizer step")
    train.add_argument("--max-steps", type=positive_int, default=9000, help="optimizer steps")
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
                       help=argparse.SUPPRESS)  # tests: stop after this step as a Ctrl-C would (but exit 0)
    train.add_argument("--no-final-eval", action="store_true", help="skip the full validation pass at the end")
    return parser


def preset_settings(args) -> dict:
    """The settings that --quick or --preset NAME put in place of the defaults (none without them)."""
    if args.quick and args.preset:
        sys.exit(f"error: --quick and --preset {args.preset} are both presets; pass one")
    return QUICK if args.quick else PRESETS.get(args.preset, {})


def parse_args(argv=None) -> argparse.Namespace:
    """The run's settings: a flag given wins over the preset it names (--quick, --preset), which wins over the
    defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = preset_settings(args)
    if settings:  # a preset replaces the defaults, flags given explicitly still win
        parser.set_defaults(**settings)
        args = parser.parse_args(argv)
    return args


NOT_GIVEN = object()  # the default of every setting while settings_given parses


def settings_given(argv=None) -> set:
    """The settings written on the command line, by a flag or by the preset it names (a resume checks these
    against the saved run and takes every other setting from it)."""
    parser = build_parser()
    parser.set_defaults(**dict.fromkeys(vars(parser.parse_args([])), NOT_GIVEN))
    given = {name for name, value in vars(parser.parse_args(argv)).items() if value is not NOT_GIVEN}
    return given | set(preset_settings(parse_args(argv)))


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
    fp32 = bf16 = 0.0
    with torch.random.fork_rng(devices=[]):  # the measurement never moves the training RNG
        for _ in range(3):  # alternating, the best of each: one busy moment of a shared machine cannot decide alone
            fp32 = max(fp32, measure(device, torch.float32, size=512, repeats=4))
            bf16 = max(bf16, measure(device, torch.bfloat16, size=512, repeats=4))
    choice = "bfloat16" if bf16 >= BF16_SPEEDUP_NEEDED * fp32 else "float32"
    return choice, f"512x512 matmul: bf16 {bf16 / 1e9:.1f} GFLOP/s, fp32 {fp32 / 1e9:.1f} GFLOP/s"


# torch.compile costs a fixed time once and then saves a fraction of every step; --compile auto compiles when the
# whole run's saving is larger than that cost. Both measured for the default model on a 2-core AMD EPYC (llm/README.md,
# Lab notes): compiling took 33 s with the compiler's cache empty (the first run on a machine) and 5 s with it warm
# (60 s leaves room for a slower machine); a compiled step took 30% less time than an eager one in bf16 and 7% less
# in fp32 (bench.py, training table, medians, since the eager steps write fewer new tensors; the default run itself
# saved 37% in bf16). The savings below stay a little under those, so a run at the edge stays eager.
COMPILE_SECONDS = 60
COMPILE_SAVES = {"bfloat16": 0.25, "float16": 0.25, "float32": 0.06}


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


def decide_compile(mode: str, device, estimated_seconds: float | None, dtype_name: str = "float32") -> tuple[bool, str]:
    """--compile on/off as given; auto compiles when the compiler works and the run is long enough to repay it:
    the time compiling saves over the whole eager estimate (COMPILE_SAVES) exceeds what it costs (COMPILE_SECONDS).

    Returns the choice and the header's words for it: "on (...)" or "off (...)" with the reason in brackets.
    """
    if mode != "auto":
        return mode == "on", f"{mode} (--compile {mode})"
    saved = estimated_seconds * COMPILE_SAVES[dtype_name]
    estimate = (f"about {estimated_seconds / 60:.1f} min of eager training, of which compiling would save about "
                f"{saved / 60:.1f} min at a cost of about {COMPILE_SECONDS / 60:.0f} min")
    if saved < COMPILE_SECONDS:
        return False, f"off ({estimate}: too short to repay it)"
    problem = compiler_problem(device.type)
    if problem:
        return False, f"off ({problem})"
    return True, f"on ({estimate})"


def automatic_attention(compiled: bool, device_type: str) -> str:
    """--attention-impl auto: compiled on a CPU the hand-written softmax becomes one generated loop, faster there than
    the fused kernel at the default context (llm/README.md, Speed); otherwise the fused kernel."""
    return "handwritten" if compiled and device_type == "cpu" else "fused"


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


# ---------------------------------------------------------------------------------------------------- set-up


@dataclass
class Run:
    """Everything the loop needs, set up once before the first step (and restored from last.pt on --resume)."""

    args: argparse.Namespace
    distributed: bool
    rank: int
    world_size: int
    device: torch.device
    prepared: object  # llm.prepare.PreparedData: tokenizer, token files and raw texts
    sampler: "BatchSampler"
    val_tokens: np.ndarray
    tokenizer_sha256: str
    model: Llama
    optimizer: torch.optim.AdamW
    scaler: torch.amp.GradScaler
    dtype_name: str
    dtype_reason: str
    resumed: bool = False
    start_step: int = 0
    best_val_loss: float = float("inf")
    last_saved_step: int | None = None  # the step of the newest last.pt (None: nothing saved yet)
    train_model: torch.nn.Module | None = None  # the model as the loop calls it: compiled and/or DDP-wrapped
    compiled: bool = False
    peak_flops: float = 1.0  # the matmul FLOP/s that MFU is measured against

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def out_dir(self) -> Path:
        return Path(self.args.out_dir)

    @property
    def global_batch(self) -> int:
        return self.args.batch_size * self.args.grad_accum * self.world_size

    @property
    def autocast(self):
        return autocast_context(self.device, self.dtype_name)

    def log(self, *arguments, **keywords):
        """print, on rank 0 only."""
        if self.is_main:
            print(*arguments, **keywords)

    def facts(self) -> dict:
        """What a checkpoint records about the run besides its settings (see llm/checkpoint.py: training_state)."""
        return {"tokenizer_path": str(self.prepared.tokenizer_path.resolve()),
                "tokenizer_sha256": self.tokenizer_sha256, "world_size": self.world_size,
                "corpus": self.prepared.folder.name, "dtype": self.dtype_name}

    def save(self, name: str, step: int):
        """Write last.pt or best.pt of this run at `step` (rank 0 only)."""
        if self.is_main:
            save_checkpoint(self.out_dir / name, training_state(self.model, self.optimizer, self.scaler, self.args,
                                                                step, self.best_val_loss, self.facts()))


def same_on_every_rank(values: list, distributed: bool) -> list:
    """Rank 0's values on every rank (what rank 0 prepared, measured or decided, every process then uses)."""
    if distributed:
        dist.broadcast_object_list(values, src=0)
    return values


def join_processes(device: torch.device) -> torch.device:
    """torchrun started this process: join the others (gloo on a CPU, NCCL on GPUs); each rank takes its GPU."""
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return device


def open_saved_run(args, given: set, world_size: int) -> dict | None:
    """Check the run folder before any work; on --resume load last.pt and take the saved run's settings."""
    check_run_folder(Path(args.out_dir), args.resume, args.overwrite)
    if not args.resume:
        return None
    checkpoint = load_checkpoint(Path(args.out_dir) / "last.pt", "llm", TRAINING_FIELDS)
    take_saved_settings(args, given, saved_settings(checkpoint), world_size)
    return checkpoint


def prepare_on_rank_zero(args, distributed: bool, is_main: bool, log):
    """Rank 0 runs (or reuses) the data pipeline; the other ranks wait for it and read what it made."""
    outcome = [None]
    if is_main:
        try:
            hf = source_from_args(args.dataset, args.hf_dataset, args.hf_config, args.hf_split, args.text_column)
            outcome[0] = prepare(args.dataset, args.vocab_size, Path(args.data_dir), args.text_file, log=log, hf=hf)
        except (PrepareError, ValueError, OSError) as error:
            outcome[0] = PrepareError(str(error))
    outcome = same_on_every_rank(outcome, distributed)
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


def build_model(args, device: torch.device) -> Llama:
    """The model of these settings, initialised from the seed; a shape that cannot be built ends in one line."""
    torch.manual_seed(args.seed)
    try:
        config = LlamaConfig(
            vocab_size=args.vocab_size, context_length=args.context_length, n_layers=args.n_layers,
            n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, d_model=args.d_model, rope_theta=args.rope_theta,
            dropout=args.dropout, attention_impl="fused" if args.attention_impl == "auto" else args.attention_impl,
        )
        return Llama(config).to(device)
    except ValueError as error:
        sys.exit(f"error: {error}")
    except (RuntimeError, MemoryError) as error:  # a shape far too large for this machine
        sys.exit(f"error: the model does not fit in memory ({str(error).strip().splitlines()[0][-120:]})")


def choose_precision(args, checkpoint: dict | None, device: torch.device) -> list:
    """[dtype name, why]: --dtype as given; auto keeps a resumed run's precision, else measures (choose_dtype)."""
    if args.dtype != "auto":
        return [args.dtype, "--dtype"]
    if checkpoint is not None and "dtype" in checkpoint:
        return [checkpoint["dtype"], "the precision of the saved run"]
    return list(choose_dtype(device))


def set_up(args, given: set) -> tuple[Run, dict | None]:
    """Everything before the first step: the processes, the run folder (and the saved run on --resume), the data,
    the model, its optimizer and precision. A problem a user can cause ends here in one line."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if distributed else (0, 1)
    log = print if rank == 0 else (lambda *a, **k: None)
    if args.threads:  # else OMP_NUM_THREADS, else torch's default: one thread per core
        torch.set_num_threads(args.threads)
    try:
        device = pick_device(args.device)
        checkpoint = open_saved_run(args, given, world_size)  # before any work: never start over a run that is there
        if distributed:
            device = join_processes(device)
        if rank == 0:
            Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        prepared = prepare_on_rank_zero(args, distributed, rank == 0, log)
        if checkpoint is not None:
            refuse_changed_settings(checkpoint, {"corpus": prepared.folder.name}, ["corpus"], SETTING_LABELS)
        val_tokens = read_token_file(prepared.token_files["valid"])
        if len(val_tokens) < args.context_length + 1:
            raise ValueError(f"the validation split has {len(val_tokens)} tokens, fewer than one window")
        sampler = BatchSampler(read_token_file(prepared.token_files["train"]), args.context_length, args.seed)
        tokenizer_sha256 = file_sha256(prepared.tokenizer_path)
    except (PrepareError, RunError, ValueError, OSError) as error:
        sys.exit(f"error: {error}")
    model = build_model(args, device)
    dtype_name, dtype_reason = same_on_every_rank(choose_precision(args, checkpoint, device), distributed)
    run = Run(args, distributed, rank, world_size, device, prepared, sampler, val_tokens, tokenizer_sha256, model,
              make_optimizer(model, args), torch.amp.GradScaler(device.type, enabled=dtype_name == "float16"),
              dtype_name, dtype_reason)
    run.log(f"model: {model.num_parameters():,} parameters ({model.num_parameters(False):,} without the embedding)")
    return run, checkpoint


# ----------------------------------------------------------------------------------------------------- restore


def restore(run: Run, checkpoint: dict) -> None:
    """--resume: weights, optimizer, scaler and random generators from last.pt; metrics logged after it forgotten."""
    last_path = run.out_dir / "last.pt"
    try:
        run.start_step, run.best_val_loss = restore_training_state(checkpoint, run.model, run.optimizer, run.scaler,
                                                                   run.tokenizer_sha256)
    except CheckpointError as error:
        sys.exit(f"error: {last_path} does not fit this run: {error}")
    run.resumed, run.last_saved_step = True, run.start_step
    if run.is_main:
        forget_metrics_after(run.out_dir / "metrics.jsonl", run.start_step)
    run.log(f"resumed from {last_path} at step {run.start_step}")
    warn_if_threads_changed(checkpoint.get("threads"))


def forget_metrics_after(metrics_path: Path, step: int) -> None:
    """Drop the metrics logged after `step` (the resumed run logs those steps again); the file is replaced whole."""
    if metrics_path.exists():
        kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= step]
        write_text_atomically(metrics_path, "".join(line + "\n" for line in kept))


def compile_and_wrap(run: Run) -> None:
    """torch.compile when it pays (decide_compile), DDP around it for several processes, and the run's header."""
    args, estimated_seconds = run.args, None
    if args.compile == "auto":
        remaining_steps = max(0, args.max_steps - run.start_step)
        estimated_seconds = remaining_steps * eager_step_seconds(run.model, args.batch_size, args.context_length,
                                                                 args.grad_accum, run.device, run.autocast)
    decision = decide_compile(args.compile, run.device, estimated_seconds, run.dtype_name)
    run.compiled, compile_reason = same_on_every_rank(list(decision), run.distributed)  # every rank runs alike
    if run.compiled and args.compile == "auto":  # should compiling fail after all, train eager rather than stop
        torch._dynamo.config.suppress_errors = True
    if args.attention_impl == "auto":  # decided with the compile
        run.model.set_attention_impl(automatic_attention(run.compiled, run.device.type))
    run.train_model = torch.compile(run.model) if run.compiled else run.model
    if run.distributed:
        run.train_model = torch.nn.parallel.DistributedDataParallel(run.train_model)
    if run.is_main:  # the peak that MFU is measured against
        run.peak_flops = measure_matmul_peak(run.device, getattr(torch, run.dtype_name))
    tokens_per_step = run.global_batch * args.context_length
    epochs = args.max_steps * tokens_per_step / max(1, len(run.sampler.tokens))
    run.log(f"global batch {run.global_batch} x {args.context_length} = {tokens_per_step:,} tokens/step; "
            f"{args.max_steps} steps = {epochs:.2f} epochs; "
            f"matmul peak {run.peak_flops / 1e9:.1f} GFLOP/s in {run.dtype_name}")
    run.log(f"dtype {run.dtype_name} ({run.dtype_reason})")
    run.log(f"compile: {compile_reason}; attention: {run.model.config.attention_impl}"
            f"{' (auto)' if args.attention_impl == 'auto' else ''}")


# ---------------------------------------------------------------------------------------------------- the loop


@dataclass
class LoopEnd:
    """How the loop ended: status finished | interrupted | diverged, after `completed_steps` steps."""

    status: str
    completed_steps: int
    diverged_loss: str = ""  # diverged: which loss was not finite, "training" or "validation"


def train_loop(run: Run) -> LoopEnd:
    """Optimizer steps from start_step to max_steps, validation and checkpoints every eval_every steps; stops early
    at a Ctrl-C (after the step in flight) or a loss that is not finite (before anything of that step is saved)."""
    args, stop, meter = run.args, StopFlag(), Throughput()
    if run.is_main and not run.resumed:
        remove_run_files(run.out_dir, RUN_FILES)  # --overwrite (or leftovers of a run that never saved a checkpoint)
    metrics = open(run.out_dir / "metrics.jsonl", "a") if run.is_main else None
    progress = tqdm(range(run.start_step, args.max_steps), initial=run.start_step, total=args.max_steps,
                    disable=not run.is_main, dynamic_ncols=True)
    flops_per_token, end = run.model.flops_per_token(), LoopEnd("finished", run.start_step)
    run.model.train()
    for step in progress:
        lr = learning_rate(step, args)
        loss, grad_norm = training_step(run, step, lr)
        if grad_norm is None:
            end = LoopEnd("diverged", step + 1, "training")
            break
        end.completed_steps = completed = step + 1
        tokens_per_second, elapsed = meter.add(run.global_batch * args.context_length)
        mfu = tokens_per_second * flops_per_token / run.peak_flops / run.world_size
        record = {"step": completed, "train_loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens_per_second, "mfu": mfu}
        if step == run.start_step:  # the first step compiles (or warms up): its time is not training throughput
            record["first_step_s"] = elapsed
            if run.compiled:
                progress.write(f"compiled in {elapsed:.0f} s (the first step; tokens/s counts from the second)")
            meter.restart()
        progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens_per_second:,.0f}", mfu=f"{mfu:.0%}")
        if completed % args.eval_every == 0 or completed == args.max_steps:
            record["val_loss"] = validate_and_save(run, completed, loss, progress)
            if not math.isfinite(record["val_loss"]):
                end = LoopEnd("diverged", completed, "validation")
                break
            meter.restart()  # evaluation time is not training time
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        if stop_requested(run, stop) or completed == args.stop_at_step:
            end.status = "interrupted"
            break
    progress.close()
    stop.close()
    if metrics is not None:
        metrics.close()
    return end


class Throughput:
    """Training tokens per second since the last restart (compiling and validating are not training time)."""

    def __init__(self):
        self.restart()

    def restart(self):
        self.start, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> tuple[float, float]:
        """Count one step's tokens; return tokens/s and the seconds since the restart."""
        self.tokens += tokens
        elapsed = time.perf_counter() - self.start
        return self.tokens / max(elapsed, 1e-9), elapsed


def training_step(run: Run, step: int, lr: float) -> tuple[float, float | None]:
    """One optimizer step over grad_accum micro-batches: (mean loss, gradient norm before clipping).

    A loss that is not finite skips the update and returns no gradient norm (the caller stops the run).
    """
    args, optimizer = run.args, run.optimizer
    for group in optimizer.param_groups:
        group["lr"] = lr
    step_loss = torch.zeros((), device=run.device)
    for micro in range(args.grad_accum):
        first = step * run.global_batch + (micro * run.world_size + run.rank) * args.batch_size
        inputs, targets = run.sampler.windows(first, args.batch_size)
        inputs, targets = inputs.to(run.device), targets.to(run.device)
        # DDP: synchronise gradients only on the last micro-batch of the step
        last_micro = micro == args.grad_accum - 1
        sync = nullcontext() if not run.distributed or last_micro else run.train_model.no_sync()
        with sync, run.autocast:
            _, loss = run.train_model(inputs, targets)
        run.scaler.scale(loss / args.grad_accum).backward()
        step_loss += loss.detach() / args.grad_accum
    if run.distributed:
        dist.all_reduce(step_loss)
        step_loss /= run.world_size
    loss_value = float(step_loss)
    if not math.isfinite(loss_value):
        return loss_value, None
    run.scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip or float("inf"))
    run.scaler.step(optimizer)
    run.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, float(grad_norm)


def validate_and_save(run: Run, completed: int, train_loss: float, progress) -> float:
    """The validation loss after `completed` steps; best.pt when it is the lowest yet, and last.pt, unless it is
    not finite (then nothing is saved and the caller stops)."""
    args = run.args
    val_loss, _ = evaluate_loss(run.model, run.val_tokens, args.context_length, args.batch_size, run.device,
                                run.autocast, args.eval_batches * run.global_batch, run.rank, run.world_size)
    if not math.isfinite(val_loss):
        return val_loss
    if val_loss < run.best_val_loss:
        run.best_val_loss = val_loss
        run.save("best.pt", completed)
    run.save("last.pt", completed)
    run.last_saved_step = completed
    if run.is_main:
        progress.write(f"step {completed}: train {train_loss:.3f}, val {val_loss:.3f}")
    return val_loss


def stop_requested(run: Run, stop: StopFlag) -> bool:
    """Was Ctrl-C pressed? Under DDP every rank stops at the same step, whichever rank the Ctrl-C reached first."""
    requested = stop.requested
    if run.distributed:
        flag = torch.tensor(float(requested), device=run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        requested = bool(flag.item())
    return requested


# ------------------------------------------------------------------------------------------------------ finish


def finish(run: Run, end: LoopEnd) -> None:
    """Save last.pt (and best.pt if no validation wrote one) and plot the curves; a diverged run saves nothing."""
    if end.status == "diverged" or not run.is_main:
        return
    run.save("last.pt", end.completed_steps)
    if end.status == "finished" and not (run.out_dir / "best.pt").exists():
        run.save("best.pt", end.completed_steps)
    plot_curves(run.out_dir / "metrics.jsonl", run.out_dir / "loss.png")


def report(run: Run, end: LoopEnd) -> None:
    """What the reader sees last: why a run stopped (and its exit status), or the test metrics and samples."""
    last_path = run.out_dir / "last.pt"
    if end.status == "diverged":
        last_good_state = ("no checkpoint was written yet" if run.last_saved_step is None
                           else f"{last_path} (step {run.last_saved_step}) holds the last good state")
        if run.is_main:
            sys.stderr.write(f"error: the {end.diverged_loss} loss is not finite at step {end.completed_steps}; "
                             f"stopped without saving: {last_good_state}\n")
        sys.exit(1)
    if end.status == "interrupted":
        run.log(f"stopped at step {end.completed_steps}; resume with: python llm/train.py --out-dir {run.out_dir} "
                "--resume")
        if end.completed_steps != run.args.stop_at_step:  # a Ctrl-C, not the test hook: the shell's status for it
            sys.exit(EXIT_INTERRUPTED)
    elif run.is_main:
        evaluate_and_sample(run.args, run.out_dir / "best.pt", run.prepared, run.device, run.out_dir)


def evaluate_and_sample(args, best_path, prepared, device, out_dir: Path):
    """Validation and test metrics of the best checkpoint (saved to results.json), then a few samples."""
    import sentencepiece as spm

    from llm.eval import half_context_stride, split_metrics

    model, checkpoint = load_model(best_path, device)
    if not args.no_final_eval:
        results = {"step": checkpoint["step"]}
        for split in ("valid", "test"):
            metrics = split_metrics(model, prepared.token_files[split], prepared.text_files[split],
                                    args.context_length, max(args.batch_size, 32), device,
                                    half_context_stride(args.context_length), split)
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


def main(argv=None):
    """Set up, restore (--resume), compile, the loop, finish; then the test metrics and samples of the best model."""
    args = parse_args(argv)
    run, checkpoint = set_up(args, settings_given(argv))
    if checkpoint is not None:
        restore(run, checkpoint)
    compile_and_wrap(run)
    try:
        end = train_loop(run)
        finish(run, end)
    finally:
        if run.distributed:
            dist.destroy_process_group()  # once, on every rank, however the loop ended
    report(run, end)


if __name__ == "__main__":
    main()
