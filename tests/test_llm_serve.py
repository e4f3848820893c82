"""Tests of the OpenAI-compatible server: batched decoding against decoding alone, request checking, and
llm/serve.py itself through the real `openai` client (chat and completions, streamed and not), under 16 concurrent
clients, against malformed bodies, and with a client that goes away mid-stream."""

import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from chat_fixtures import RunningServer, save_tiny_chat_model

from llm.batching import Engine, Request
from llm.conversation import Sampling
from llm.generate import generate
from llm.model import KVCache, Llama, LlamaConfig
from llm.openai_api import APIError, StopStrings, parse_chat, parse_completion

SMOLLM2 = Path(os.environ.get("HCL_DATA_MIRROR", "/nonexistent")) / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
GREEDY = Sampling(temperature=0)


def tiny_float64_llama(context_length: int = 128) -> Llama:
    """A random Llama in float64, whose batched and single scores agree far below any gap between two tokens."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, context_length=context_length, n_layers=2, n_heads=4, n_kv_heads=2,
                         d_model=64)
    model = Llama(config).double().eval()
    for parameter in model.parameters():
        parameter.data.normal_(0, 0.2)
    return model


def test_last_only_gives_the_last_logits_of_a_full_forward_and_the_default_path_is_unchanged():
    model = tiny_float64_llama()
    tokens = torch.randint(0, 300, (3, 20))
    with torch.inference_mode():
        full, _ = model(tokens)
        last, _ = model(tokens, last_only=True)
        cache = KVCache(model.config, 3, 20, "cpu", torch.float64)
        model(tokens[:, :12], cache=cache)
        cached_last, _ = model(tokens[:, 12:], cache=cache, last_only=True)
    assert last.shape == (3, 1, 300)
    torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=1e-12)
    torch.testing.assert_close(cached_last, full[:, -1:], rtol=0, atol=1e-12)


class Collected:
    """What the engine handed one request: its tokens and how it finished."""

    def __init__(self):
        self.tokens, self.finish, self.done = [], None, threading.Event()

    def emit(self, token, finish):
        if finish is None:
            self.tokens.append(token)
        else:
            self.finish = finish
            self.done.set()


def test_continuous_batching_gives_every_request_the_tokens_it_gets_alone():
    model = tiny_float64_llama()
    prompts = [torch.randint(0, 300, (length,)).tolist() for length in (3, 17, 9, 40, 5, 12, 25, 8)]
    alone = [generate(model, prompt, 10 + 3 * index, temperature=0) for index, prompt in enumerate(prompts)]
    engine = Engine(model, max_batch=4)
    results = [Collected() for _ in prompts]
    for index, prompt in enumerate(prompts):  # eight requests for four rows: four wait for a row to free up
        engine.submit(Request(prompt, 10 + 3 * index, GREEDY, set(), results[index].emit))
    engine.start()
    try:
        assert all(result.done.wait(30) for result in results)
    finally:
        engine.stop()
    assert [result.tokens for result in results] == alone
    assert {result.finish for result in results} == {"length"}
    sizes = engine.stats()["decode_steps_by_batch_size"]
    assert max(sizes) == 4 and len(sizes) >= 3  # rows left as they ended, waiting ones joined


def test_each_row_of_the_batch_counts_its_own_tokens_for_the_penalties():
    model = tiny_float64_llama()
    prompts = [[5, 60, 7], [200, 9, 31, 4]]
    penalized = Sampling(temperature=0, presence_penalty=2.0)  # far above the tiny model's score differences
    plain, penalized_results = [Collected() for _ in prompts], [Collected() for _ in prompts]
    engine = Engine(model, max_batch=4)
    for index, prompt in enumerate(prompts):  # four rows decoded together, two with penalties
        engine.submit(Request(prompt, 30, GREEDY, set(), plain[index].emit))
        engine.submit(Request(prompt, 30, penalized, set(), penalized_results[index].emit))
    engine.start()
    try:
        assert all(result.done.wait(30) for result in plain + penalized_results)
    finally:
        engine.stop()
    assert [result.tokens for result in plain] == [generate(model, prompt, 30, temperature=0) for prompt in prompts]
    assert any(len(set(result.tokens)) < 30 for result in plain)  # greedy, the tiny model repeats itself
    assert all(len(set(result.tokens)) == 30 for result in penalized_results)  # no token twice in its own row


def test_a_cancelled_request_leaves_the_batch_and_a_stop_token_ends_a_row():
    model = tiny_float64_llama(context_length=2048)
    prompt = [5, 60, 7, 200, 9]
    greedy = generate(model, prompt, 12, temperature=0)
    first_new = next(index for index in range(1, 12) if greedy[index] not in greedy[:index])
    engine = Engine(model, max_batch=2)
    engine.start()
    try:
        long, stopped = Collected(), Collected()
        long_request = Request(prompt, 2000, GREEDY, set(), long.emit)
        engine.submit(long_request)
        engine.submit(Request(prompt, 2000, GREEDY, {greedy[first_new]}, stopped.emit))
        assert stopped.done.wait(30) and stopped.finish == "stop" and stopped.tokens == greedy[:first_new]
        long_request.cancel()
        assert long.done.wait(30) and long.finish == "cancelled" and len(long.tokens) < 2000
        deadline = time.monotonic() + 5
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats()["running"] == 0
    finally:
        engine.stop()


class WordTokenizer:
    """One id per character, enough to check requests."""

    vocab_size, stop_ids = 256, (0,)

    def encode(self, text):
        return [ord(character) % 256 for character in text]

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return "".join(f"<{message['role']}>{message['content']}" for message in messages) + "<assistant>"


BAD_CHAT_BODIES = [
    ({"messages": [{"role": "user", "content": "Hi"}]}, 400, "model"),
    ({"model": "other", "messages": [{"role": "user", "content": "Hi"}]}, 404, "model"),
    ({"model": "m", "messages": []}, 400, "messages"),
    ({"model": "m", "messages": "Hi"}, 400, "messages"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "Hi"}]}, 400, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content"),
    ({"model": "m", "messages": ["Hi"]}, 400, "messages[0]"),
    ({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "temperature": 2.5}, 400, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "temperature": -0.1}, 400, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "top_p": 0}, 400, "top_p"),
    ({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2.5}, 400, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1000}, 400, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": -3}, 400,
     "max_completion_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "Hi" * 100}]}, 400, None),  # the prompt fills it
    ({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stop": ["a"] * 5}, 400, "stop"),
    ({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stop": 7}, 400, "stop"),
    ({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "seed": "x"}, 400, "seed"),
    ({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "n": 2}, 400, "n"),
    ({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "frequency_penalty": 2.5}, 400,
     "frequency_penalty"),
    ({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "presence_penalty": "x"}, 400, "presence_penalty"),
    ({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": "yes"}, 400, "stream"),
]


@pytest.mark.parametrize("body, status, param", BAD_CHAT_BODIES)
def test_a_bad_chat_request_is_refused_with_the_status_and_field_a_client_expects(body, status, param):
    with pytest.raises(APIError) as refused:
        parse_chat(body, WordTokenizer(), "m", window=128)
    assert refused.value.status == status and refused.value.param == param


def test_good_requests_give_the_prompt_the_limits_and_the_sampling_asked_for():
    body = {"model": "m", "messages": [{"role": "developer", "content": "Be brief."},
                                       {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "temperature": 0, "top_p": 0.5, "max_completion_tokens": 7, "stop": "\n", "seed": 3, "stream": True,
            "stream_options": {"include_usage": True}, "frequency_penalty": 0.5, "presence_penalty": -1}
    job = parse_chat(body, WordTokenizer(), "m", window=128)
    assert job.prompt_ids == WordTokenizer().encode("<system>Be brief.<user>Hi<assistant>")
    assert (job.max_tokens, job.sampling, job.stop, job.seed, job.stream, job.include_usage) == (
        7, Sampling(temperature=0, top_p=0.5, top_k=0, frequency_penalty=0.5, presence_penalty=-1), ["\n"], 3, True,
        True)
    assert parse_chat({"model": "m", "messages": [{"role": "user", "content": "Hi"}]}, WordTokenizer(), "m",
                      window=128).max_tokens == 128 - len("<user>Hi<assistant>")  # the rest of the context
    completion = parse_completion({"model": "m", "prompt": [1, 2, 3]}, WordTokenizer(), "m", window=128)
    assert completion.prompt_ids == [1, 2, 3] and completion.max_tokens == 16
    for bad in ({"model": "m"}, {"model": "m", "prompt": ""}, {"model": "m", "prompt": [1, 999]},
                {"model": "m", "prompt": "x", "echo": True}):
        with pytest.raises(APIError):
            parse_completion(bad, WordTokenizer(), "m", window=128)


def test_stop_strings_cut_the_text_even_when_a_stop_string_is_split_across_pieces():
    stops = StopStrings(["</end>", "##"])
    sent = [stops.push(piece) for piece in ["Hello <", "/e", "nx> wor", "ld </e", "nd> never"]]
    assert "".join(text for text, _ in sent) == "Hello </enx> world "
    assert [stopped for _, stopped in sent] == [False, False, False, False, True]
    assert StopStrings([]).push("abc") == ("abc", False)
    single = StopStrings(["#"])
    assert single.push("a#b") == ("a", True)


# ------------------------------------------------------------------------------------------ llm/serve.py


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = save_tiny_chat_model(tmp_path_factory.mktemp("served"), context_length=2048, never_ends_turn=True)
    running = RunningServer("--hf", str(folder), "--model-name", "tiny", "--max-body-bytes", "20000")
    yield running
    running.stop()


def client_of(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.mark.slow
def test_openai_client_chat_streamed_and_not_gives_the_same_greedy_answer_with_usage(server):
    client = client_of(server)
    assert [model.id for model in client.models.list()] == ["tiny"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12)
    assert whole.object == "chat.completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12 and whole.usage.total_tokens == whole.usage.prompt_tokens + 12
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    assert {chunk.id for chunk in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content and len(text) > 3
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    seeded = [client.chat.completions.create(model="tiny", messages=messages, temperature=1.0, seed=7,
                                             max_tokens=12).choices[0].message.content for _ in range(2)]
    assert seeded[0] == seeded[1]


@pytest.mark.slow
def test_openai_client_completions_streamed_and_not_and_stop_strings(server):
    client = client_of(server)
    whole = client.completions.create(model="tiny", prompt="The capital of France", temperature=0, max_tokens=10)
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 10
    streamed = list(client.completions.create(model="tiny", prompt="The capital of France", temperature=0,
                                              max_tokens=10, stream=True))
    assert "".join(chunk.choices[0].text for chunk in streamed) == whole.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"
    text = whole.choices[0].text
    stop = text[len(text) // 2 :][:2]
    cut = client.completions.create(model="tiny", prompt="The capital of France", temperature=0, max_tokens=10,
                                    stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_sixteen_concurrent_clients_each_get_the_whole_answer_they_get_alone(server):
    client = client_of(server)
    questions = [f"Question {index}: {'why ' * (index % 5)}is the sky blue?" for index in range(16)]

    def ask(question: str, stream: bool) -> str:
        messages = [{"role": "user", "content": question}]
        if not stream:
            answer = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=24)
            assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 24
            return answer.choices[0].message.content
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=24,
                                                     stream=True))
        assert chunks[-1].choices[0].finish_reason == "length"
        return "".join(chunk.choices[0].delta.content or "" for chunk in chunks)

    alone = [ask(question, stream=False) for question in questions]
    before = server.health()["decode_steps_by_batch_size"]
    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, questions, [index % 2 == 0 for index in range(16)], timeout=120))
    assert time.monotonic() - started < 120
    assert together == alone
    after = server.health()["decode_steps_by_batch_size"]
    batched = {int(size): count - before.get(size, 0) for size, count in after.items() if int(size) >= 8}
    assert sum(batched.values()) > 0  # at least some steps decoded eight or more requests at once


def post(server, path: str, body: bytes, content_type: str = "application/json"):
    """(status, parsed JSON) of a raw POST, whatever the body."""
    import httpx

    response = httpx.post(server.url + path, content=body, headers={"Content-Type": content_type}, timeout=60)
    return response.status_code, response.json()


@pytest.mark.slow
def test_malformed_bodies_each_get_an_openai_json_error_and_the_server_keeps_serving(server):
    import httpx

    good = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
    fixed = [(b"", 400), (b"{", 400), (b"null", 400), (b"[1, 2]", 400), (b'"text"', 400), (b"\xff\xfe\x00", 400),
             (json.dumps({**good, "model": "gpt-4"}).encode(), 404), (b"{" + b" " * 30000 + b"}", 413),
             (json.dumps({**good, "max_tokens": 5000}).encode(), 400)]
    for body, status in fixed:
        got, answer = post(server, "/v1/chat/completions", body)
        assert got == status and set(answer["error"]) == {"message", "type", "param", "code"}, (body[:40], answer)
    for path in ("/v1/nothing", "/v2/chat/completions"):
        response = httpx.get(server.url + path, timeout=10)
        assert response.status_code == 404 and "error" in response.json()
    randomly = random.Random(0)
    values = [None, -1, 0, 1, 2.5, 1e30, "x", "", [], {}, True, [1], {"role": "user"}, "\u0000\ud7ff"]
    for _ in range(120):
        body = json.loads(json.dumps(good))
        field = randomly.choice(["model", "messages", "max_tokens", "temperature", "top_p", "stop", "seed", "stream",
                                 "n", "messages.0", "messages.0.role", "messages.0.content", "stream_options"])
        target, _, key = field.rpartition(".")
        holder = body
        for step in filter(None, target.split(".")):
            holder = holder[int(step)] if isinstance(holder, list) else holder[step]
        holder[int(key) if isinstance(holder, list) else key] = randomly.choice(values)
        raw = json.dumps(body).encode()
        if randomly.random() < 0.2:
            raw = raw[: randomly.randrange(len(raw))]  # a truncated body
        status, answer = post(server, randomly.choice(["/v1/chat/completions", "/v1/completions"]), raw)
        assert status in (200, 400, 404), (raw, status, answer)
        assert ("error" in answer) == (status != 200), (raw, answer)
    status, answer = post(server, "/v1/chat/completions", json.dumps(good).encode())
    assert status == 200 and answer["usage"]["completion_tokens"] == 3
    assert server.health()["status"] == "ok"


@pytest.mark.slow
def test_a_client_that_disconnects_mid_stream_stops_its_generation_at_once(server):
    import httpx

    before = server.health()["tokens_generated"]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Talk"}], "max_tokens": 1500,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(10)]
    assert all(line.startswith("data: ") or not line for line in received)
    deadline = time.monotonic() + 5
    while server.health()["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    health = server.health()
    assert health["running"] == 0
    assert health["tokens_generated"] - before < 1500  # the whole answer would have been 1,500 tokens


@pytest.mark.slow
def test_serve_cli_refuses_bad_flags_a_missing_model_and_a_busy_port_in_one_line(tmp_path):
    import socket
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    folder = save_tiny_chat_model(tmp_path / "model")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        for arguments, expected in [(["--port", "0"], "--port"), (["--port", "70000"], "--port"),
                                    (["--max-batch", "0"], "--max-batch"), (["--hf", str(tmp_path / "none")], "error"),
                                    (["--hf", str(folder), "--port", str(busy.getsockname()[1])], "cannot listen")]:
            result = subprocess.run([sys.executable, str(repo / "llm/serve.py"), *arguments], capture_output=True,
                                    text=True, timeout=120, cwd=repo)
            assert result.returncode != 0 and "Traceback" not in result.stderr, (arguments, result.stderr)
            assert expected in result.stderr.strip().splitlines()[-1], (arguments, result.stderr)


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.is_file(), reason="the SmolLM2 GGUF is not in the data mirror (HCL_DATA_MIRROR)")
def test_smollm2_served_in_bfloat16_answers_the_openai_client():
    running = RunningServer("--gguf", str(SMOLLM2), "--dtype", "bfloat16")
    try:
        client = client_of(SimpleNamespace(url=running.url))
        assert [model.id for model in client.models.list()] == ["SmolLM2-135M-Instruct"]
        question = [{"role": "user", "content": "What is the capital of France?"}]
        answer = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=question, temperature=0,
                                                max_tokens=30)
        assert "Paris" in answer.choices[0].message.content and answer.choices[0].finish_reason == "stop"
        streamed = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=question, temperature=0,
                                                  max_tokens=30, stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == answer.choices[0].message.content
    finally:
        running.stop()
