"""Tests of the terminal chat: the KV cache kept across turns, the context that overflows, stopping an answer,
sampling, and llm/chat.py itself (--prompt, piped stdin, and a real terminal with Ctrl-C and Ctrl-D)."""

import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from chat_fixtures import save_tiny_chat_model

from llm.chat_model import load_chat_model
from llm.conversation import ChatSession, ContextFull, Sampling, common_prefix_length, penalize, pick_token
from llm.fast_decoding import PackedLinear, fastest_layout, packing_available, prepare_for_decoding
from llm.generate import generate

REPO_ROOT = Path(__file__).resolve().parents[1]
GREEDY = Sampling(temperature=0)
SMOLLM2 = Path(os.environ.get("HCL_DATA_MIRROR", "/nonexistent")) / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture
def tiny(tiny_folder):
    torch.set_num_threads(1)
    return load_chat_model(hf=str(tiny_folder))


def count_read_tokens(model) -> list[int]:
    """Record how many tokens each forward pass of the model reads."""
    sizes = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].size(1)))
    return sizes


def test_a_new_turn_reads_only_its_own_tokens_and_answers_as_a_full_reprefill(tiny):
    model, tokenizer = tiny
    kept = ChatSession(model, tokenizer, system="Be brief.")
    for question in ("Hello there", "What is Paris?"):
        "".join(kept.reply(question, GREEDY, max_new_tokens=6))
    history = list(kept.turns)
    prompt_before = list(kept.cached_ids)
    sizes = count_read_tokens(model)
    answer_kept = "".join(kept.reply("And Spain?", GREEDY, max_new_tokens=6))
    new_prompt = kept.prompt_ids()  # now with the answer: its prefix is the prompt the third answer started from
    third_prompt = tokenizer.encode(tokenizer.apply_chat_template(kept.messages()[:-1]))
    reused = common_prefix_length(prompt_before, third_prompt)
    assert sizes[0] == len(third_prompt) - reused and reused > 0.6 * len(third_prompt)
    assert sizes[1:] == [1] * (len(sizes) - 1)  # then one token per decode step
    fresh = ChatSession(model, tokenizer, system="Be brief.")
    fresh.turns = history
    assert "".join(fresh.reply("And Spain?", GREEDY, max_new_tokens=6)) == answer_kept
    assert new_prompt[: len(third_prompt)] == third_prompt


def test_conversation_past_the_context_drops_the_oldest_turns_and_keeps_the_system_prompt(tiny_folder):
    model, tokenizer = load_chat_model(hf=str(tiny_folder))
    model.set_rope_table(80)  # a context of 80 tokens
    notices = []
    session = ChatSession(model, tokenizer, system="Be brief.", notice=notices.append)
    for turn in range(6):
        answer = "".join(session.reply(f"Tell me about Paris, turn {turn}.", GREEDY, max_new_tokens=12))
        assert answer and len(session.cached_ids) < 80  # every position the model read lay inside its context
    assert any("dropped the oldest" in notice for notice in notices)
    assert session.messages()[0] == {"role": "system", "content": "Be brief."}
    assert session.turns[-2]["content"] == "Tell me about Paris, turn 5."


def test_a_message_longer_than_the_context_is_refused_in_one_line_and_the_chat_goes_on(tiny):
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer)
    "".join(session.reply("Hello", GREEDY, max_new_tokens=4))
    with pytest.raises(ContextFull, match="reads at most 256"):
        "".join(session.reply("Paris " * 300, GREEDY, max_new_tokens=4))
    assert [turn["role"] for turn in session.turns] == ["user", "assistant"]
    assert "".join(session.reply("Hello again", GREEDY, max_new_tokens=4))


def test_an_answer_ends_at_a_stop_token_or_when_asked_to_keeping_what_was_written(tiny):
    model, tokenizer = tiny
    prompt = ChatSession(model, tokenizer)
    prompt.turns = [{"role": "user", "content": "Hello"}]
    prompt_ids = prompt.prompt_ids()
    greedy = generate(model, prompt_ids, 8, temperature=0)
    assert not set(greedy) & set(tokenizer.stop_ids)
    stops_at_third = SimpleNamespace(encode=tokenizer.encode, decode=tokenizer.decode, stop_ids=(greedy[2],),
                                     apply_chat_template=tokenizer.apply_chat_template)
    stopping = ChatSession(model, stops_at_third)
    answer = "".join(stopping.reply("Hello", GREEDY, max_new_tokens=8))
    assert stopping.finish_reason == "stop" and stopping.cached_ids == prompt_ids + greedy[:2]
    assert stopping.turns[-1] == {"role": "assistant", "content": answer}
    checks = []
    interrupted = ChatSession(model, tokenizer)
    answer = "".join(interrupted.reply("Hello", GREEDY, 8, should_stop=lambda: checks.append(1) or len(checks) > 3))
    assert interrupted.finish_reason == "interrupted" and interrupted.turns[-1]["content"] == answer
    assert interrupted.cached_ids == prompt_ids + greedy[:3]  # stopped before choosing the fourth token


def test_greedy_and_top_k_1_pick_the_most_likely_token_and_a_seed_repeats_a_draw():
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0])
    assert pick_token(logits, Sampling(temperature=0)) == 1
    assert pick_token(logits, Sampling(temperature=5.0, top_k=1)) == 1
    draws = [[pick_token(logits, Sampling(temperature=1.0, top_p=1.0), torch.Generator().manual_seed(seed))
              for _ in range(1)] for seed in range(40)]
    assert len({draw[0] for draw in draws}) > 2  # sampling does sample
    again = [[pick_token(logits, Sampling(temperature=1.0, top_p=1.0), torch.Generator().manual_seed(seed))]
             for seed in range(40)]
    assert draws == again
    nucleus = {pick_token(logits, Sampling(temperature=1.0, top_p=0.5), torch.Generator().manual_seed(seed))
               for seed in range(40)}
    assert nucleus <= {1, 2}  # tokens 1 and 2 hold over half the mass between them; the rest is never drawn


def test_penalties_subtract_the_openai_formula_from_the_tokens_already_written():
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0])
    counts = Counter({1: 3, 3: 1})  # token 1 written three times so far, token 3 once
    sampling = Sampling(temperature=0, frequency_penalty=0.5, presence_penalty=0.25)
    expected = torch.tensor([0.1, 2.0 - 3 * 0.5 - 0.25, 1.9, -1.0 - 0.5 - 0.25])
    torch.testing.assert_close(penalize(logits, counts, sampling), expected)
    assert pick_token(logits, sampling, counts=counts) == 2  # token 1 lost its lead to token 2
    assert pick_token(logits, Sampling(temperature=0), counts=counts) == 1  # no penalty, no change
    assert penalize(logits, counts, Sampling()) is logits and penalize(logits, None, sampling) is logits
    favoured = penalize(logits, counts, Sampling(frequency_penalty=-1))  # negative values favour repetition
    assert favoured[1] == 5.0 and favoured[3] == 0.0


def test_a_presence_penalty_keeps_a_greedy_answer_from_repeating_a_token(tiny):
    model, tokenizer = tiny
    answers = {}
    for penalty in (0.0, 2.0):
        session = ChatSession(model, tokenizer)
        "".join(session.reply("Hello", Sampling(temperature=0, presence_penalty=penalty), max_new_tokens=24))
        prompt = tokenizer.encode(tokenizer.apply_chat_template(session.messages()[:-1]))  # up to the answer
        answers[penalty] = session.cached_ids[len(prompt):]  # the answer's tokens (all but the last, never read)
    assert len(set(answers[0.0])) < len(answers[0.0])  # the random tiny model repeats itself greedily
    assert len(set(answers[2.0])) == len(answers[2.0]) > 10  # its scores lie far closer together than 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["row", "column", "packed"])
def test_every_weight_layout_gives_the_scores_and_greedy_tokens_of_the_plain_model(tiny_folder, layout, dtype):
    if layout == "packed" and not packing_available(dtype):
        pytest.skip("this PyTorch has no oneDNN packing")
    plain, _ = load_chat_model(hf=str(tiny_folder), dtype=dtype)
    laid_out, _ = load_chat_model(hf=str(tiny_folder), dtype=dtype)
    choices = prepare_for_decoding(laid_out, choose=lambda weight: layout)
    assert set(choices.values()) == {layout}
    if layout == "packed":
        assert isinstance(laid_out.output_proj, PackedLinear) and isinstance(laid_out.blocks[0].ffn.down_proj,
                                                                             PackedLinear)
    tokens = torch.randint(0, 320, (2, 30))
    with torch.inference_mode():
        expected, _ = plain(tokens)
        got, _ = laid_out(tokens)
    torch.testing.assert_close(got.float(), expected.float(), atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0)
    assert generate(laid_out, tokens[0, :5].tolist(), 12, temperature=0) == generate(plain, tokens[0, :5].tolist(),
                                                                                    12, temperature=0)


def test_the_fastest_layout_is_measured_per_shape_and_one_of_the_three():
    weight = torch.randn(96, 64)
    assert fastest_layout(weight) in ("row", "column", "packed")


# ---------------------------------------------------------------------------------------------- llm/chat.py


def run_chat(*arguments: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "llm/chat.py"), *arguments], cwd=REPO_ROOT, input=stdin,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_chat_cli_answers_a_prompt_flag_and_a_piped_stdin_once_and_refuses_bad_input_in_one_line(tiny_folder):
    flag = run_chat("--hf", str(tiny_folder), "--prompt", "Hello", "--max-new-tokens", "5", "--temperature", "0",
                    "--frequency-penalty", "0", "--presence-penalty", "0")  # zero penalties: the same answer
    piped = run_chat("--hf", str(tiny_folder), "--max-new-tokens", "5", "--temperature", "0", stdin="Hello\n")
    assert flag.returncode == 0 and piped.returncode == 0, flag.stderr + piped.stderr
    assert flag.stdout == piped.stdout and flag.stdout.strip()
    shown = run_chat("--hf", str(tiny_folder), "--prompt", "Hello", "--max-new-tokens", "2", "--show-prompt",
                     "--system", "Be brief.")
    assert "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n" in (
        shown.stderr)
    for arguments, stdin, expected in [
        (["--temperature", "-1", "--prompt", "x"], None, "--temperature"),
        (["--top-p", "1.5", "--prompt", "x"], None, "--top-p"),
        (["--frequency-penalty", "2.5", "--prompt", "x"], None, "--frequency-penalty"),
        (["--presence-penalty", "nan", "--prompt", "x"], None, "--presence-penalty"),
        (["--max-new-tokens", "0", "--prompt", "x"], None, "--max-new-tokens"),
        (["--hf", str(tiny_folder / "missing")], "Hello", "error:"),
        (["--hf", str(tiny_folder)], "  \n", "the prompt is empty"),
        (["--checkpoint", str(tiny_folder / "config.json"), "--prompt", "x"], None, "error:"),
    ]:
        result = run_chat(*arguments, stdin=stdin)
        last_line = result.stderr.strip().splitlines()[-1]
        assert result.returncode != 0 and expected in last_line and "error" in last_line, (arguments, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr


class Terminal:
    """A program in a pseudo-terminal of its own: what a person at a keyboard sees and types (Ctrl-C included)."""

    def __init__(self, *arguments: str):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal, so ^C becomes SIGINT
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # as in a user's terminal, even where this test's own
            os.chdir(REPO_ROOT)  # SIGINT is ignored (a job started in the background), which a child would inherit
            os.execve(sys.executable, [sys.executable, *arguments], {**os.environ, "OMP_NUM_THREADS": "1"})
        self.seen = ""

    def read_until(self, text: str, timeout: float = 60) -> str:
        """Everything printed until `text` appears (which is consumed with it)."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            if time.monotonic() > deadline or not select.select([self.fd], [], [], deadline - time.monotonic())[0]:
                raise AssertionError(f"{text!r} did not appear; the terminal shows {self.seen[-2000:]!r}")
            try:
                self.seen += os.read(self.fd, 65536).decode("utf-8", errors="replace")
            except OSError:  # the program ended
                raise AssertionError(f"{text!r} did not appear before the end: {self.seen[-2000:]!r}") from None
        before, _, self.seen = self.seen.partition(text)
        return before

    def type(self, keys: str):
        os.write(self.fd, keys.encode())

    def exit_code(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if select.select([self.fd], [], [], 0.1)[0]:  # a read with nothing to read would block forever
                    self.seen += os.read(self.fd, 65536).decode("utf-8", errors="replace")
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"the chat did not exit; the terminal shows {self.seen[-2000:]!r}")


@pytest.mark.slow
def test_interactive_chat_streams_takes_commands_stops_on_ctrl_c_and_quits_on_a_second_one(tmp_path):
    folder = save_tiny_chat_model(tmp_path / "long", context_length=4096, never_ends_turn=True)
    chat = Terminal(str(REPO_ROOT / "llm/chat.py"), "--hf", str(folder), "--max-new-tokens", "4000", "--temperature",
                    "0")
    chat.read_until(">>> ")
    chat.type("/system Be brief.\r")
    chat.read_until("(system prompt: 'Be brief.')")
    chat.type("/reset\r")
    chat.read_until("(a new conversation)")
    chat.type("/help\r")
    chat.read_until("commands: /reset")
    chat.type("Hello\r")
    chat.read_until("Hello")  # the terminal's echo of the line
    time.sleep(0.5)  # the answer streams (4,000 tokens of a random model take seconds)
    chat.type("\x03")
    answer = chat.read_until("(stopped)")
    assert len(answer.strip()) > 10  # some of the answer was printed before it stopped
    chat.read_until(">>> ")  # back at the prompt, still running
    chat.type("Again\r")
    chat.read_until("Again")
    time.sleep(0.3)
    chat.type("\x03")
    chat.read_until("(stopped)")
    chat.read_until(">>> ")
    # The second Ctrl-C comes after the first is handled, as a person's would: two SIGINTs that arrive while a tensor
    # operation holds the interpreter are handled as one. And it comes a moment after the prompt shows: one typed
    # within microseconds of it can reach the process before readline waits for a key, and then nothing wakes it.
    time.sleep(0.5)
    chat.type("\x03")
    assert chat.exit_code() == 0


@pytest.mark.slow
def test_interactive_chat_keeps_the_conversation_and_quits_on_ctrl_d(tiny_folder):
    chat = Terminal(str(REPO_ROOT / "llm/chat.py"), "--hf", str(tiny_folder), "--max-new-tokens", "3",
                    "--temperature", "0")
    chat.read_until(">>> ")
    chat.type("Hello\r")
    first = chat.read_until(">>> ")
    chat.type("Hello\r")
    second = chat.read_until(">>> ")
    assert first.strip() and second.strip()
    chat.type("\x04")  # Ctrl-D at the prompt
    assert chat.exit_code() == 0


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.is_file(), reason="the SmolLM2 GGUF is not in the data mirror (HCL_DATA_MIRROR)")
def test_chat_with_smollm2_names_paris_and_keeps_its_cache_across_turns():
    result = run_chat("--gguf", str(SMOLLM2), "--prompt", "What is the capital of France?", "--temperature", "0")
    assert result.returncode == 0 and "Paris" in result.stdout, result.stderr
    torch.set_num_threads(1)
    model, tokenizer = load_chat_model(gguf=str(SMOLLM2))
    session = ChatSession(model, tokenizer)
    assert "Paris" in "".join(session.reply("What is the capital of France?", GREEDY, 20))
    sizes = count_read_tokens(model)
    second = "".join(session.reply("And of Spain?", GREEDY, 20))
    assert "Madrid" in second and session.finish_reason == "stop"
    assert sizes[0] < 20 < len(session.cached_ids)  # the second turn read only its own few tokens
