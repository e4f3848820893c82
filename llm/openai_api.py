"""The OpenAI protocol, as llm/serve.py speaks it: checking a request's body, and the JSON objects of the answers.

A chat request names a model, lists the messages of the conversation and says how to sample:

    {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0.2,
     "max_tokens": 64, "stream": true}

The answer is one "chat.completion" object, or with "stream": true a series of server-sent events, one
"chat.completion.chunk" object each, whose "delta" carries the next piece of text, the last one a finish_reason
("stop": the model ended its turn or a stop string came; "length": max_tokens or the context ran out), then the
line `data: [DONE]`. Every error is {"error": {"message", "type", "param", "code"}} with an HTTP status.
"""

import json
import math
import time
import uuid
from dataclasses import dataclass, field

from llm.chat_template import ChatTemplateError
from llm.conversation import Sampling

ROLES = {"system", "developer", "user", "assistant"}  # "developer" is the newer name of "system"
DEFAULT_MAX_TOKENS = {"chat": 1024, "completion": 16}  # when a request gives none (OpenAI's default for completions)


class APIError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """A checked request: what to read, how to sample and when to stop."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    completion_tokens: int = 0
    id: str = ""
    created: int = 0

    @property
    def usage(self) -> dict:
        prompt = len(self.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}


async def read_json_body(request, limit: int) -> dict:
    """The body as a JSON object; 413 past `limit` bytes (checked while reading), 400 when it is not JSON."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"The request body is {int(declared):,} bytes; this server accepts at most {limit:,}.",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"The request body exceeds {limit:,} bytes.", code="request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "We could not parse the JSON body of your request: it is not valid JSON.") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    return body


def number(body: dict, name: str, default, low=None, high=None, integer: bool = False, above_low: bool = False):
    """A numeric field, checked for type and range (None or absent: the default)."""
    value = body.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise APIError(400, f"Invalid '{name}': expected {kind}, got {json.dumps(value)[:40]}.", param=name)
    if not math.isfinite(value):
        raise APIError(400, f"Invalid '{name}': expected a finite number.", param=name)
    if low is not None and (value <= low if above_low else value < low):
        raise APIError(400, f"Invalid '{name}': {value} is {'at or ' if above_low else ''}below the minimum "
                            f"{'(exclusive) ' if above_low else ''}{low}.", param=name)
    if high is not None and value > high:
        raise APIError(400, f"Invalid '{name}': {value} is above the maximum {high}.", param=name)
    return value


def check_model(body: dict, model_id: str):
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "You must provide a model parameter (a string).", param="model")
    if model != model_id:
        raise APIError(404, f"The model `{model}` does not exist; this server has `{model_id}`.", param="model",
                       code="model_not_found")


def message_text(message, index: int) -> tuple[str, str]:
    """(role, text) of one message; its content is a string or a list of text parts."""
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise APIError(400, f"Invalid '{param}': expected an object with role and content.", param=param)
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise APIError(400, f"Invalid '{param}.role': {json.dumps(role)[:40]} is not one of "
                            f"{', '.join(sorted(ROLES))}.", param=f"{param}.role")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, list):
        if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                   for part in content):
            raise APIError(400, f"Invalid '{param}.content': only text parts are supported.", param=f"{param}.content")
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise APIError(400, f"Invalid '{param}.content': expected a string.", param=f"{param}.content")
    return ("system" if role == "developer" else role), content


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(item, str) and item for item in stop):
        raise APIError(400, "Invalid 'stop': expected a non-empty string or a list of at most 4 of them.",
                       param="stop")
    return stop


def common_fields(body: dict, prompt_ids: list[int], window: int, kind: str) -> Job:
    """The sampling, length and streaming fields that chat and completion requests share."""
    if number(body, "n", 1, low=1, integer=True) != 1:
        raise APIError(400, "Invalid 'n': this server returns one choice per request.", param="n")
    sampling = Sampling(temperature=number(body, "temperature", Sampling.temperature, low=0, high=2),
                        top_p=number(body, "top_p", Sampling.top_p, low=0, high=1, above_low=True),
                        top_k=number(body, "top_k", 0, low=0, integer=True),
                        frequency_penalty=number(body, "frequency_penalty", 0.0, low=-2, high=2),
                        presence_penalty=number(body, "presence_penalty", 0.0, low=-2, high=2))
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    room = window - len(prompt_ids)
    if room <= 0:
        raise APIError(400, f"This model's maximum context length is {window} tokens, and the prompt alone has "
                            f"{len(prompt_ids)}.", code="context_length_exceeded")
    max_tokens = number(body, name, None, low=1, integer=True)
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"This model's maximum context length is {window} tokens; you requested "
                            f"{len(prompt_ids) + max_tokens} ({len(prompt_ids)} in the prompt, {max_tokens} for the "
                            f"completion).", param=name, code="context_length_exceeded")
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise APIError(400, "Invalid 'stream': expected true or false (and 'stream_options' an object).",
                       param="stream")
    return Job(prompt_ids, max_tokens or min(DEFAULT_MAX_TOKENS[kind], room), sampling,
               seed=number(body, "seed", None, low=0, high=2**63 - 1, integer=True), stop=stop_strings(body),
               stream=stream, include_usage=bool(options.get("include_usage")), id=new_id(kind),
               created=int(time.time()))


def parse_chat(body: dict, tokenizer, model_id: str, window: int) -> Job:
    """A /v1/chat/completions body -> Job; APIError for anything a client got wrong."""
    check_model(body, model_id)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "Invalid 'messages': expected a non-empty list of messages.", param="messages")
    conversation = [dict(zip(("role", "content"), message_text(message, index)))
                    for index, message in enumerate(messages)]
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
    except ChatTemplateError as error:
        raise APIError(400, str(error), param="messages") from None
    return common_fields(body, tokenizer.encode(text), window, "chat")


def parse_completion(body: dict, tokenizer, model_id: str, window: int) -> Job:
    """A /v1/completions body (a prompt to continue, as text or as token ids) -> Job."""
    check_model(body, model_id)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        prompt_ids = tokenizer.encode(prompt)
    elif (isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt)
          and all(0 <= i < tokenizer.vocab_size for i in prompt)):
        prompt_ids = list(prompt)
    else:
        raise APIError(400, "Invalid 'prompt': expected a non-empty string (or one list of token ids).",
                       param="prompt")
    for unsupported in ("echo", "suffix", "logprobs"):
        if body.get(unsupported):
            raise APIError(400, f"'{unsupported}' is not supported by this server.", param=unsupported)
    return common_fields(body, prompt_ids, window, "completion")


class StopStrings:
    """Cut the streamed text at the first stop string, holding back a tail that might be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending = list(stops), ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text that is safe to send, whether a stop string was reached)."""
        self.pending += text
        found = [index for index in (self.pending.find(stop) for stop in self.stops) if index >= 0]
        if found:
            text, self.pending = self.pending[: min(found)], ""
            return text, True
        held = max((k for stop in self.stops for k in range(1, len(stop)) if self.pending.endswith(stop[:k])),
                   default=0)
        text, self.pending = self.pending[: len(self.pending) - held], self.pending[len(self.pending) - held :]
        return text, False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def chat_response(job: Job, model_id: str, text: str, finish_reason: str) -> dict:
    return {"id": job.id, "object": "chat.completion", "created": job.created, "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}], "usage": job.usage}


def chat_chunk(job: Job, model_id: str, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": model_id,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def completion_response(job: Job, model_id: str, text: str, finish_reason: str | None) -> dict:
    return {"id": job.id, "object": "text_completion", "created": job.created, "model": model_id,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": job.usage}


def usage_chunk(job: Job, model_id: str, kind: str) -> dict:
    """The extra last event of a stream whose request asked for stream_options.include_usage."""
    return {"id": job.id, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": job.created, "model": model_id, "choices": [], "usage": job.usage}
