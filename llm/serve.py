"""An OpenAI-compatible server for the hand-written Llama, with a chat page at its root.

    python llm/serve.py                         # SmolLM2-135M-Instruct on http://127.0.0.1:8000 (open it: the page)
    python llm/serve.py --gguf PATH --dtype bfloat16 --port 8080

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi"}])

Endpoints: GET /v1/models, POST /v1/chat/completions and /v1/completions (streamed as server-sent events with
"stream": true), GET /health, GET / (the page). The protocol's objects are built in llm/openai_api.py; requests
that arrive while others are being answered join the running batch between two decode steps (llm/batching.py).
"""

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import aclosing, asynccontextmanager
from pathlib import Path

import torch

from llm.batching import Engine, Request
from llm.chat_model import add_model_arguments, chat_model_from_arguments
from llm.chat_template import IncrementalDecoder
from llm.openai_api import (
    APIError,
    Job,
    StopStrings,
    chat_chunk,
    chat_response,
    completion_response,
    parse_chat,
    parse_completion,
    read_json_body,
    usage_chunk,
)
from llm.runs import positive_int

PAGE = Path(__file__).with_name("chat.html")
EVENT_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Server:
    """The model behind the endpoints: hands a checked Job to the engine and turns its tokens back into text."""

    def __init__(self, model, tokenizer, model_id: str, max_batch: int = 16, max_body_bytes: int = 1 << 20):
        self.tokenizer, self.model_id = tokenizer, model_id
        self.window = model.rope_cos.size(0)
        self.max_body_bytes = max_body_bytes
        self.engine = Engine(model, max_batch)

    async def pieces(self, job: Job, is_disconnected):
        """Yield (text, None) as the answer grows, then (text, finish_reason); the request is cancelled on exit,
        so a client that goes away (a closed stream, or a disconnect seen while waiting) frees its row at once."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        seed = job.seed if job.seed is not None else torch.seed() % 2**63
        request = Request(job.prompt_ids, job.max_tokens, job.sampling, set(self.tokenizer.stop_ids),
                          emit=lambda token, finish: loop.call_soon_threadsafe(events.put_nowait, (token, finish)),
                          generator=torch.Generator().manual_seed(seed))
        decoder, stops = IncrementalDecoder(self.tokenizer, job.prompt_ids), StopStrings(job.stop)
        self.engine.submit(request)
        try:
            while True:
                try:
                    token, finish = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await is_disconnected():
                        return
                    continue
                if finish is not None:
                    ended = finish in ("stop", "length")  # the held-back text belongs to the answer
                    yield (stops.push(decoder.flush())[0] + stops.flush() if ended else ""), finish
                    return
                job.completion_tokens += 1
                text, stopped = stops.push(decoder.push(token))
                if stopped:
                    yield text, "stop"
                    return
                if text:
                    yield text, None
        finally:
            request.cancel()

    async def answer(self, job: Job, request, kind: str, json_response, streaming_response):
        """The whole answer as one JSON object, or (stream) a StreamingResponse of server-sent events."""
        pieces = self.pieces(job, request.is_disconnected)
        if job.stream:
            return streaming_response(self.events(job, pieces, kind), media_type="text/event-stream",
                                      headers=EVENT_STREAM_HEADERS)
        texts, finish = [], None
        async with aclosing(pieces):
            async for text, finish_reason in pieces:
                texts.append(text)
                finish = finish_reason
        if finish not in ("stop", "length"):
            raise APIError(500, "The server had an error while generating.", type="server_error")
        build = chat_response if kind == "chat" else completion_response
        return json_response(build(job, self.model_id, "".join(texts), finish))

    async def events(self, job: Job, pieces, kind: str):
        """The server-sent events of a streamed answer, ending with `data: [DONE]`."""
        def chunk(text: str, finish=None) -> dict:
            if kind == "chat":
                return chat_chunk(job, self.model_id, {"content": text} if text or finish is None else {}, finish)
            return {**completion_response(job, self.model_id, text, finish), "usage": None}

        if kind == "chat":
            yield sse(chat_chunk(job, self.model_id, {"role": "assistant", "content": ""}))
        async with aclosing(pieces):
            async for text, finish in pieces:
                if finish in ("stop", "length"):
                    yield sse(chunk(text, finish))
                elif finish is not None:
                    yield sse(APIError(500, "The server had an error while generating.", type="server_error").body())
                elif text:
                    yield sse(chunk(text))
        if job.include_usage:
            yield sse(usage_chunk(job, self.model_id, kind))
        yield sse("[DONE]")


def sse(payload) -> str:
    """One server-sent event: a `data:` line and a blank line."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def add_error_handlers(app):
    """OpenAI's error object, with its HTTP status, for every failure: ours, an unknown path, a crash."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def error_response(error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        if error.status_code == 404:
            return error_response(APIError(404, f"Unknown path {request.url.path}.", code="unknown_url"))
        return error_response(APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}."))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, error):
        return error_response(APIError(400, "The request is malformed."))

    @app.exception_handler(Exception)
    async def server_error(request, error: Exception):
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return error_response(APIError(500, "The server had an error while processing the request.",
                                       type="server_error"))


def create_app(server: Server):
    """The FastAPI application: the page, the health check and the OpenAI routes."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

    @asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        yield
        server.engine.stop()

    app = FastAPI(title="hand-craft-llm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    add_error_handlers(app)

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_id, **server.engine.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(server)]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str):
        if model_id != server.model_id:
            raise APIError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
        return model_card(server)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json_body(request, server.max_body_bytes)
        job = parse_chat(body, server.tokenizer, server.model_id, server.window)
        return await server.answer(job, request, "chat", JSONResponse, StreamingResponse)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json_body(request, server.max_body_bytes)
        job = parse_completion(body, server.tokenizer, server.model_id, server.window)
        return await server.answer(job, request, "completion", JSONResponse, StreamingResponse)

    return app


def model_card(server: Server) -> dict:
    return {"id": server.model_id, "object": "model", "created": 0, "owned_by": "hand-craft-llm",
            "context_length": server.window}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (1-65535)")
    parser.add_argument("--model-name", default=None,
                        help="the model id clients ask for (default: the model file's name without its extension)")
    parser.add_argument("--max-batch", type=positive_int, default=16,
                        help="the most requests decoded together; more wait for a free row")
    parser.add_argument("--max-body-bytes", type=positive_int, default=1 << 20,
                        help="larger request bodies are refused (413)")
    return parser


def default_model_name(args) -> str:
    if args.model_name:
        return args.model_name
    source = args.gguf or args.hf or args.checkpoint
    if source is None:
        return "SmolLM2-135M-Instruct"
    name = Path(source.rstrip("/")).name
    return name.split(".")[0] if args.gguf else name


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads, so that a busy port is said at once and in one line."""
    if not 0 < port < 65536:
        raise ValueError(f"--port {port} is not a port (1-65535)")
    try:
        address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(address[0], socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address[4])
    except OSError as error:
        raise ValueError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return listener


def start_server_process(arguments: list[str], environment=None, quiet=False) -> tuple[subprocess.Popen, str]:
    """serve.py started as a process on a free local port with these arguments, for scripts that talk to it:
    (process, base url) once /health answers; RuntimeError (one line) if it ends or is silent for two minutes."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    output = subprocess.DEVNULL if quiet else None
    process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--port", str(port), *arguments],
                               env=environment, stdout=output, stderr=output)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if process.poll() is not None:
            raise RuntimeError(f"serve.py ended with exit status {process.returncode}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("serve.py did not answer within two minutes")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        listener = listening_socket(args.host, args.port)
        model, tokenizer = chat_model_from_arguments(args)
    except ValueError as error:
        sys.exit(f"error: {error}")
    import uvicorn

    server = Server(model, tokenizer, default_model_name(args), args.max_batch, args.max_body_bytes)
    print(f"serving {server.model_id} on http://{args.host}:{args.port} (the chat page at /, the OpenAI API at /v1)",
          file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning")).run(sockets=[listener])


if __name__ == "__main__":
    main()
