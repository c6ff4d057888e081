"""Chat conversations -> token ids plus which tokens are training targets.

    template = load_chat_template(cfg.data.tokenizer, tokenizer)
    ids, targets = template.encode([{"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hello!"}])

Only assistant turns (their content and closing marker) are targets. The tokenizer's
`chat_template` is rendered as transformers' `apply_chat_template` does, within RENDER_SECONDS;
without one the built-in Moonlight-Instruct format is used. How the assistant spans are found:
docs/data.md.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import signal
import threading
from typing import Any, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moonlight.errors import DataError

__all__ = ["ROLES", "ChatTemplate", "load_chat_template", "messages_problem"]

ROLES = ("system", "user", "assistant")
_ROLE_TOKENS = {"system": "<|im_system|>", "user": "<|im_user|>", "assistant": "<|im_assistant|>"}
_MIDDLE, _END = "<|im_middle|>", "<|im_end|>"
RENDER_SECONDS = 10.0  # per rendering; real templates take milliseconds


class _Expired(Exception):  # noqa: N818 (a control-flow signal)
    pass


@contextlib.contextmanager
def _time_budget(seconds: float):
    """Raise _Expired in the main thread after `seconds` (SIGALRM; elsewhere unbounded)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise _Expired

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def messages_problem(messages: Any) -> str | None:
    """Why `messages` is not a usable conversation, or None."""
    if not isinstance(messages, list) or not messages:
        return f"messages must be a non-empty list, got {'[]' if messages == [] else type(messages).__name__}"
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return f"message {k} must be an object with a string 'content'"
        if m.get("role") not in ROLES:
            return f"message {k} has role {m.get('role')!r}; roles are {', '.join(ROLES)}"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message (nothing to train on)"
    return None


class ChatTemplate:
    """Renders conversations for one tokenizer; `jinja_template` None = the built-in format."""

    def __init__(
        self,
        tokenizer: Any,
        jinja_template: str | None = None,
        template_vars: dict | None = None,
        source: str = "the tokenizer folder",
    ):
        self.tokenizer = tokenizer
        self.source = source  # named in errors: the tokenizer_config.json holding the template
        specials = getattr(tokenizer, "special_tokens", {})
        if jinja_template is None:
            missing = [t for t in (*_ROLE_TOKENS.values(), _MIDDLE, _END) if t not in specials]
            if missing:
                raise DataError(
                    f"the tokenizer has no {', '.join(missing)} token(s) for the built-in Moonlight chat "
                    "format; use a tokenizer directory whose tokenizer_config.json has a chat_template"
                )
            self._compiled = None
        else:
            self._compiled = _compile(jinja_template, source)
        self.template_vars = template_vars or {}
        self._specials = specials
        # longest first, so that a special token that contains another one wins
        names = sorted(specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    @property
    def end_id(self) -> int | None:
        """The id of `<|im_end|>`, where an assistant turn (and generation) ends."""
        return self._specials.get(_END)

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of `messages` followed by the assistant's generation prompt (what a model continues)."""
        if self._compiled is not None:
            return self._encode_text(self.render(messages, add_generation_prompt=True))
        sp = self._specials
        return self._encode_builtin(messages)[0] + [
            sp[_ROLE_TOKENS["assistant"]],
            *self.tokenizer.encode("assistant"),
            sp[_MIDDLE],
        ]

    def encode(self, messages: Sequence[dict]) -> tuple[list[int], list[bool]]:
        """(token ids, is-target flag per token) of one conversation."""
        if self._compiled is None:
            return self._encode_builtin(messages)
        return self._encode_jinja(messages)

    # ------------------------------------------------------------------ built-in format
    def _encode_builtin(self, messages: Sequence[dict]) -> tuple[list[int], list[bool]]:
        ids: list[int] = []
        targets: list[bool] = []
        sp = self._specials
        for m in messages:
            role = m["role"]
            header = [sp[_ROLE_TOKENS[role]], *self.tokenizer.encode(role), sp[_MIDDLE]]
            body = [*self.tokenizer.encode(m["content"]), sp[_END]]
            ids += header + body
            targets += [False] * len(header) + [role == "assistant"] * len(body)
        return ids, targets

    # ------------------------------------------------------------------ jinja templates
    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        try:
            with _time_budget(RENDER_SECONDS):
                return self._compiled.render(
                    messages=list(messages), add_generation_prompt=add_generation_prompt, **self.template_vars
                )
        except _Expired:
            raise DataError(
                f"the chat_template of {self.source} did not render a conversation within "
                f"{RENDER_SECONDS:g} s (runaway loops?): fix or remove it"
            ) from None
        except Exception as e:  # the template's own failure (sandbox refusals, raise_exception, bad values)
            raise DataError(f"the chat_template of {self.source} failed: {type(e).__name__}: {e}") from None

    def _encode_jinja(self, messages: Sequence[dict]) -> tuple[list[int], list[bool]]:
        text = self.render(messages)
        ids: list[int] = []
        targets: list[bool] = []
        cut = 0  # end of the text encoded so far

        def append(piece: str, is_target: bool) -> None:
            piece_ids = self._encode_text(piece)
            ids.extend(piece_ids)
            targets.extend([is_target] * len(piece_ids))

        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            turn = self.render(messages[: i + 1])
            if not (turn.startswith(prompt) and text.startswith(turn) and len(prompt) >= cut):
                raise DataError(
                    "the chat template does not render a conversation by appending turns (a prefix "
                    f"of it renders differently at assistant message {i}), so its assistant tokens "
                    "cannot be located"
                )
            append(text[cut : len(prompt)], False)
            append(text[len(prompt) : len(turn)], True)
            cut = len(turn)
        append(text[cut:], False)
        return ids, targets

    def _encode_text(self, text: str) -> list[int]:
        """Text with special-token strings in it: those become their ids, the rest is encoded."""
        if not text:
            return []
        if self._split is None:
            return self.tokenizer.encode(text)
        ids: list[int] = []
        for k, piece in enumerate(self._split.split(text)):
            if k % 2:
                ids.append(self._specials[piece])
            elif piece:
                ids += self.tokenizer.encode(piece)
        return ids


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask markers) renders its body;
    the spans are found by prefix rendering instead."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _compile(template: str, source: str):
    """A jinja2 template compiled as transformers compiles chat templates, in a sandbox (a template
    from a model directory cannot reach Python objects)."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise DataError(f"the chat_template of {source}: jinja syntax error at line {e.lineno}: {e.message}") from None


def _token_string(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_chat_template(tokenizer_spec: str, tokenizer: Any) -> ChatTemplate:
    """The chat template of the tokenizer at `tokenizer_spec` (its directory's tokenizer_config.json
    `chat_template`, with that file's special-token strings as template variables), else the built-in
    Moonlight-Instruct format."""
    config_path = None
    if tokenizer_spec != "byte":
        path = os.path.expanduser(tokenizer_spec)
        folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        config_path = os.path.join(folder, "tokenizer_config.json")
    if config_path is None or not os.path.exists(config_path):
        return ChatTemplate(tokenizer)
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...] as transformers allows
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not template:
        return ChatTemplate(tokenizer)
    variables = {k: _token_string(v) for k, v in config.items() if k.endswith("_token") and _token_string(v)}
    return ChatTemplate(tokenizer, template, variables, source=config_path)
