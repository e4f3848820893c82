"""A tiny chat model for the chat and server tests: a random Llama with a byte-level BPE tokenizer and a ChatML
chat template, saved as a Hugging Face folder (what --hf reads), so no test needs the network or a large file."""

import json
from pathlib import Path

import torch

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TRAINING_TEXT = ["The capital of France is Paris.", "El sol sale por el este.", "def add(a, b):\n    return a + b",
                 "Chat models answer questions.", "你好，世界", "Naïve café, déjà vu. 🙂"] * 20


def save_tiny_chat_model(folder: Path, context_length: int = 256, vocab_size: int = 320,
                         never_ends_turn: bool = False) -> Path:
    """A random transformers Llama (2 layers, d 64, 4/2 heads) and its tokenizer, in `folder`.

    never_ends_turn: the end-of-turn token's embedding row is zero, so its score is 0 while the best token's is
    positive: a greedy answer runs until max_new_tokens (for tests that stop an answer half-way).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    end_of_turn = tokenizer.token_to_id("<|im_end|>")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None, "add_bos_token": False}))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=context_length, initializer_range=0.2, tie_word_embeddings=True,
                         eos_token_id=end_of_turn, bos_token_id=None)
    model = LlamaForCausalLM(config)
    if never_ends_turn:
        with torch.no_grad():
            model.model.embed_tokens.weight[end_of_turn] = 0
    model.generation_config.eos_token_id = end_of_turn
    model.save_pretrained(folder)
    return folder


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RunningServer:
    """`python llm/serve.py ARGS` on a free port of 127.0.0.1, stopped (and waited for) on exit."""

    def __init__(self, *arguments: str, startup_seconds: float = 120):
        import os
        import subprocess
        import sys
        import time
        import urllib.request

        repo = Path(__file__).resolve().parents[1]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"serve-{self.port}.log", "w+")  # noqa: SIM115
        self.process = subprocess.Popen([sys.executable, str(repo / "llm/serve.py"), "--port", str(self.port),
                                         *arguments], cwd=repo, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + startup_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve.py exited with {self.process.returncode}: {self.output()}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2).read()
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"serve.py did not answer within {startup_seconds} s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-3000:]

    def health(self) -> dict:
        import urllib.request

        return json.loads(urllib.request.urlopen(self.url + "/health", timeout=10).read())

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except Exception:  # noqa: BLE001 - it did not stop by itself
            self.process.kill()
            self.process.wait()
        self.log.close()
