"""Checkpoints of the llm chapter, in one place: what a training checkpoint holds, saving and restoring it side by
side, the settings a resumed run keeps, and loading a trained model for eval.py, generate.py and export.py.

    state = training_state(model, optimizer, scaler, args, step, best_val_loss, facts)   # train.py saves it
    step, best_val_loss = restore_training_state(checkpoint, model, optimizer, scaler, tokenizer_sha256)
    model, checkpoint = load_model("runs/llm/best.pt", device)                          # everyone else

The file format itself (weights-only torch.load, atomic saves, one-line errors) is runs.py's, shared by every
chapter; this module knows what an llm checkpoint contains.
"""

from pathlib import Path

import torch

from llm.model import Llama, LlamaConfig
from llm.prepare import file_sha256
from llm.runs import CheckpointError, load_checkpoint, refuse_changed_settings

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
# The fields a training checkpoint must hold for --resume (best.pt and last.pt hold them all).
TRAINING_FIELDS = ("model", "optimizer", "config", "args", "step", "best_val_loss", "rng_cpu")

# Checkpoints written before a rename still load: an old name or value is read as today's.
RENAMED_SETTINGS = {"ffn_hidden_size": "ffn_hidden"}
RENAMED_VALUES = {"attention_impl": {"torch": "fused"}}


def current_names(settings: dict) -> dict:
    """A saved config or args dict with any older setting names and values replaced by today's."""
    renamed = {RENAMED_SETTINGS.get(name, name): value for name, value in settings.items()}
    for name, old_to_new in RENAMED_VALUES.items():
        if renamed.get(name) in old_to_new:
            renamed[name] = old_to_new[renamed[name]]
    return renamed


def saved_config(checkpoint: dict) -> LlamaConfig:
    """The model configuration a checkpoint was trained with."""
    return LlamaConfig(**current_names(checkpoint["config"]))


# ---- the settings of a resumed run ----

def take_saved_settings(args, given: set, saved: dict, world_size: int) -> None:
    """A resumed run keeps the settings of the saved run; a setting given anew (named in `given`) with another value
    is refused with one CheckpointError line."""
    saved = current_names(saved)
    for name in FIXED_ON_RESUME + DATA_SETTINGS:
        if name in saved and name not in given and hasattr(args, name):
            setattr(args, name, saved[name])
    refuse_changed_settings(saved, {**vars(args), "world_size": world_size}, FIXED_ON_RESUME, SETTING_LABELS)


def saved_settings(checkpoint: dict) -> dict:
    """The settings a resume compares: the saved command line, the process count and the corpus."""
    return {**checkpoint["args"], **{key: checkpoint[key] for key in ("world_size", "corpus") if key in checkpoint}}


# ---- saving and restoring a training checkpoint ----

def training_state(model: Llama, optimizer, scaler, args, step: int, best_val_loss: float, facts: dict) -> dict:
    """Everything a resume needs to continue bit for bit: weights, AdamW's moments, the loss scaler, the settings,
    the step, the random generators, and the facts of the run (`facts`: tokenizer path and sha256, corpus, process
    count, precision). The thread count is recorded too: a resume at another count is warned about."""
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "config": model.config.to_dict(), "args": dict(vars(args)), "step": step, "best_val_loss": best_val_loss,
        "rng_cpu": torch.get_rng_state(), "threads": torch.get_num_threads(), **facts,
    }
    device = model.embedding.weight.device
    if device.type == "cuda":  # this process's GPU generator (every DDP rank draws the same stream on its own GPU)
        state["rng_cuda"] = torch.cuda.get_rng_state(device)  # a CPU tensor: it loads on any machine
    return state


def restore_training_state(checkpoint: dict, model: Llama, optimizer, scaler, tokenizer_sha256: str) -> tuple:
    """The other half of training_state: put weights, moments, scaler and random generators back, after checking
    that the checkpoint belongs to this model and tokenizer. Returns (step, best validation loss)."""
    if saved_config(checkpoint) != model.config:
        raise CheckpointError("it was trained with another model configuration")
    if checkpoint.get("tokenizer_sha256") != tokenizer_sha256:
        raise CheckpointError("it was trained with another tokenizer")
    try:
        model.load_state_dict(checkpoint["model"])  # copies the CPU tensors into the model on its device
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint.get("scaler", {}) or scaler.state_dict())
        torch.set_rng_state(checkpoint["rng_cpu"])
        device = model.embedding.weight.device
        if device.type == "cuda" and "rng_cuda" in checkpoint:
            torch.cuda.set_rng_state(checkpoint["rng_cuda"], device)
        return int(checkpoint["step"]), float(checkpoint["best_val_loss"])
    except (RuntimeError, KeyError, ValueError, TypeError) as error:
        raise CheckpointError(str(error).splitlines()[0]) from None


# ---- a trained model for evaluation, generation and export ----

def load_model(checkpoint_path, device) -> tuple[Llama, dict]:
    """The model of a checkpoint written by llm/train.py, on `device`, and the checkpoint's other fields.

    Raises CheckpointError (one line) for a file that is not such a checkpoint.
    """
    path = Path(checkpoint_path)
    checkpoint = load_checkpoint(path, "llm", ("model", "config"))  # on the CPU, tensors only
    try:
        model = Llama(saved_config(checkpoint)).to(device)
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} does not match its config: {str(error).splitlines()[0]}") from None
    if checkpoint.get("args", {}).get("attention_impl") == "auto":  # the same function; uncompiled, fused is faster
        model.set_attention_impl("fused")
    return model, checkpoint


def check_tokenizer(checkpoint: dict, tokenizer_path, checkpoint_path) -> None:
    """Refuse, in one line, a tokenizer other than the one the checkpoint recorded (by sha256)."""
    recorded = checkpoint.get("tokenizer_sha256")
    if recorded and file_sha256(Path(tokenizer_path)) != recorded:
        raise CheckpointError(f"the tokenizer {tokenizer_path} is not the one {checkpoint_path} was trained with "
                              f"(its sha256 differs: the text or the vocabulary changed since); refusing to score or "
                              f"generate with ids that mean other pieces")


def saved_tokenizer(checkpoint: dict) -> Path:
    """The tokenizer file a checkpoint was trained with (it must still be where training left it)."""
    tokenizer_path = Path(checkpoint.get("tokenizer_path", ""))
    if not tokenizer_path.is_file():
        raise CheckpointError(f"the tokenizer {str(tokenizer_path)!r} of this checkpoint is missing; "
                              "rerun llm/train.py")
    return tokenizer_path
