"""A conversation into the text a chat model reads, and the tokens it writes back into text as they stream.

    text = render_chat_template(template, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    decoder = IncrementalDecoder(tokenizer); print(decoder.push(token_id), end="")

A chat model was fine-tuned on conversations written in one exact format: special tokens that open and close each
turn, a role name, a default system prompt. That format ships with the model as a Jinja template (the
`chat_template` of a tokenizer_config.json or of a GGUF file's metadata). render_chat_template renders it in the
environment transformers uses (a sandbox, trim_blocks and lstrip_blocks, loop controls, raise_exception,
strftime_now, a tojson that keeps non-ASCII characters), so the model sees the very text it was trained on.
"""

import json
from datetime import datetime


class ChatTemplateError(ValueError):
    """A chat template that does not compile or refuses the conversation; printed as one line."""


def jinja_environment():
    """The Jinja environment transformers renders chat templates in (utils/chat_template_utils.py)."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """{% generation %}...{% endgeneration %} marks the assistant's text in some templates; it renders as is."""

        tags = {"generation"}

        def parse(self, parser):
            line = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(line)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return environment


_compiled: dict[str, object] = {}  # template text -> compiled template (a chat renders the same one every turn)


def render_chat_template(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                         **special_tokens) -> str:
    """The conversation as the model's text; with add_generation_prompt, ending where the assistant's answer starts.

    messages: [{"role": "system" | "user" | "assistant", "content": str}, ...]; special_tokens: bos_token,
    eos_token, ... as a template may use them.
    """
    import jinja2

    if not template:
        raise ChatTemplateError("this model has no chat template")
    try:
        if template not in _compiled:
            _compiled[template] = jinja_environment().from_string(template)
        return _compiled[template].render(messages=[dict(message) for message in messages], tools=None,
                                          documents=None, add_generation_prompt=add_generation_prompt,
                                          **special_tokens)
    except jinja2.exceptions.TemplateError as error:
        raise ChatTemplateError(f"the chat template refused the conversation: {error}") from None


class IncrementalDecoder:
    """Turn generated ids into text one token at a time, never printing half a character.

    A byte-level BPE (and SentencePiece's byte fallback) can cut a character's UTF-8 bytes across two tokens: the
    first token alone decodes to U+FFFD, the replacement character. push() decodes the tokens since the last text
    it returned, together with the few tokens before them (so that a decoder that drops a word's leading space at
    the start of a text keeps it here), and returns the new text only once it no longer ends in U+FFFD.
    """

    def __init__(self, tokenizer, context_ids=()):
        self.tokenizer = tokenizer
        self.ids = list(context_ids)[-4:]  # the prompt's last tokens: context for the first word's spacing
        self.prefix_start = 0  # ids[prefix_start:text_start] were returned already and serve as context
        self.text_start = len(self.ids)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that became complete (often one token's, sometimes '')."""
        self.ids.append(int(token_id))
        before = self.tokenizer.decode(self.ids[self.prefix_start : self.text_start])
        text = self.tokenizer.decode(self.ids[self.prefix_start :])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""  # a special token that decodes to nothing, or a character still missing bytes
        self.prefix_start, self.text_start = self.text_start, len(self.ids)
        return text[len(before) :]

    def flush(self) -> str:
        """The text still held back at the end (bytes that never completed a character come out as U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.prefix_start : self.text_start])
        text = self.tokenizer.decode(self.ids[self.prefix_start :])
        self.prefix_start = self.text_start = len(self.ids)
        return text[len(before) :]
