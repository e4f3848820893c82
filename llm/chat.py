"""Chat with a model in the terminal: the answer streams token by token, and the KV cache is kept across turns.

    python llm/chat.py                                      # SmolLM2-135M-Instruct, fetched and verified
    python llm/chat.py --gguf PATH | --hf PATH_OR_NAME | --checkpoint PATH
    python llm/chat.py --prompt "What is the capital of France?"      # answer once and exit, for scripts
    echo "What is the capital of France?" | python llm/chat.py

In the chat: /reset starts the conversation again, /system TEXT sets the system prompt, /quit (or Ctrl-D) ends.
Ctrl-C while the model answers stops the answer; a second Ctrl-C quits.
"""

import argparse
import signal
import sys

import torch

from llm.chat_model import add_model_arguments, chat_model_from_arguments
from llm.conversation import ChatSession, ContextFull, Sampling
from llm.runs import finite_float, non_negative_float, non_negative_int, positive_int, seed_int

HELP = "commands: /reset (start again), /system TEXT (set the system prompt), /quit (or Ctrl-D); Ctrl-C stops an answer"


def top_p_value(text: str) -> float:
    """A probability in (0, 1]."""
    value = non_negative_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


def penalty_value(text: str) -> float:
    """A number in [-2, 2], the range the OpenAI API allows its penalties."""
    value = finite_float(text)
    if not -2 <= value <= 2:
        raise argparse.ArgumentTypeError(f"must lie in [-2, 2], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--system", default=None,
                        help="the system prompt (default: the chat template's own, if it has one)")
    parser.add_argument("--prompt", default=None, help="answer this one message and exit (also: pipe it to stdin)")
    parser.add_argument("--temperature", type=non_negative_float, default=0.2,
                        help="0 = always the most likely token; higher = more varied")
    parser.add_argument("--top-p", type=top_p_value, default=0.9,
                        help="sample from the smallest set of tokens whose probability reaches this, in (0, 1]")
    parser.add_argument("--top-k", type=non_negative_int, default=0,
                        help="sample only among the k most likely tokens (0 = all)")
    parser.add_argument("--frequency-penalty", type=penalty_value, default=0.0,
                        help="subtract this from a token's score for every time the answer already holds it, in "
                             "[-2, 2] (0 = off; positive values against repeating, as in the OpenAI API)")
    parser.add_argument("--presence-penalty", type=penalty_value, default=0.0,
                        help="subtract this once from the score of every token the answer already holds, in [-2, 2]")
    parser.add_argument("--max-new-tokens", type=positive_int, default=512, help="the longest answer, in tokens")
    parser.add_argument("--seed", type=seed_int, default=None, help="random seed of the sampler (default: random)")
    parser.add_argument("--show-prompt", action="store_true",
                        help="print (to stderr) the text the model reads each turn: the chat template at work")
    return parser


class AnswerInterrupts:
    """While an answer streams, the first Ctrl-C asks it to stop; a second one raises KeyboardInterrupt (quit)."""

    def __init__(self):
        self.pressed = False

    def __enter__(self):
        self.pressed = False
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signal_number, frame):
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True

    def __exit__(self, *exception):
        signal.signal(signal.SIGINT, self.previous)


def answer(session: ChatSession, text: str, args, generator, should_stop=lambda: False):
    """Stream the answer to `text` onto stdout; one line on stderr when it could not be given or ended oddly."""
    written = False
    if args.show_prompt:
        conversation = session.messages() + [{"role": "user", "content": text}]
        print(session.tokenizer.apply_chat_template(conversation), file=sys.stderr, end="", flush=True)
    try:
        for piece in session.reply(text, sampling_of(args), args.max_new_tokens, generator, should_stop):
            sys.stdout.write(piece)
            sys.stdout.flush()
            written = written or bool(piece.strip())
    except ContextFull as error:
        print(f"error: {error}", file=sys.stderr)
        return
    print(flush=True)
    if session.finish_reason == "interrupted":
        print("(stopped)", file=sys.stderr, flush=True)
    elif not written:
        print("(the model ended its answer without writing anything)", file=sys.stderr, flush=True)


def sampling_of(args) -> Sampling:
    return Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty)


def handle_command(session: ChatSession, line: str) -> bool:
    """Carry out a /command; False when the chat should end."""
    command, _, rest = line.partition(" ")
    if command in ("/quit", "/exit", "/bye"):
        return False
    if command == "/reset":
        session.reset()
        print("(a new conversation)", file=sys.stderr)
    elif command == "/system":
        session.system = rest.strip() or None
        print(f"(system prompt: {session.system!r})" if session.system else "(the template's default system prompt)",
              file=sys.stderr)
    else:
        print(HELP, file=sys.stderr)
    return True


def chat_loop(session: ChatSession, args, generator):
    """Read a line, answer it, repeat; Ctrl-D, /quit, or Ctrl-C at the prompt end the chat."""
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    print(HELP, file=sys.stderr)
    interrupts = AnswerInterrupts()
    try:
        while True:
            line = input(">>> ").strip()
            if not line:
                continue
            if line.startswith("/"):
                if not handle_command(session, line):
                    break
                continue
            with interrupts:
                answer(session, line, args, generator, should_stop=lambda: interrupts.pressed)
    except (EOFError, KeyboardInterrupt):
        print(file=sys.stderr)


def main(argv=None):
    args = build_parser().parse_args(argv)
    interactive = args.prompt is None and sys.stdin.isatty()
    prompt = args.prompt if args.prompt is not None else (None if interactive else sys.stdin.read())
    if prompt is not None and not prompt.strip():
        sys.exit("error: the prompt is empty")
    try:
        model, tokenizer = chat_model_from_arguments(args)
    except ValueError as error:
        sys.exit(f"error: {error}")
    generator = torch.Generator().manual_seed(args.seed if args.seed is not None else torch.seed() % 2**32)
    session = ChatSession(model, tokenizer, system=args.system)
    if interactive:
        chat_loop(session, args, generator)
        return
    try:
        answer(session, prompt.strip(), args, generator)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
