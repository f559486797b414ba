"""The requests of `swarm api`: OpenAI's completion and chat bodies checked, field by field, and
turned into what the engine runs (token ids, a :class:`~swarm.engine.generation.GenerationConfig`,
stop strings). Pure functions over the decoded JSON: every refusal is an :class:`ApiError` naming
the field, which the app sends in OpenAI's error shape.

Parameters follow OpenAI's meaning: ``temperature`` 0 is greedy (the same tokens as `swarm
generate` without sampling flags), otherwise sampling at that temperature (default 1, as OpenAI);
``top_p`` and ``seed`` as `swarm generate --top-p/--seed`. Two extensions other OpenAI-compatible
servers take too: ``top_k`` and ``repetition_penalty``. ``frequency_penalty`` and
``presence_penalty`` (additive, per count) have no equal in the engine (a multiplicative
repetition penalty): anything but 0 is refused, pointing at ``repetition_penalty``.

``n`` choices (at most :data:`MAX_CHOICES`) are generated at once, as sessions the servers batch;
with a ``seed``, choice ``i`` is what ``seed + i`` gives alone (so choice 0 is the request with
``n`` 1). Log-probabilities as OpenAI defines them: completions' ``logprobs`` (the number of top
alternatives, 0 to :data:`MAX_TOP_LOGPROBS`) and ``echo`` (the prompt, and with ``logprobs`` its
tokens' log-probabilities, the first's null); chat's ``logprobs`` (true/false) and
``top_logprobs``. They are the model's own (the log-softmax of its logits), before repetition
penalty, temperature, top-k and top-p. ``best_of``, ``suffix``, ``logit_bias``, tools and
non-text content are refused clearly; unknown fields are ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from swarm.engine.generation import GenerationConfig
from swarm.engine.speculative import DRAFTS

MAX_STOPS = 4  # as OpenAI
MAX_STOP_CHARS = 256
MAX_MESSAGES = 1024
MAX_CHOICES = 16  # n; also at most `swarm api --max-requests` (each choice is a generation)
MAX_TOP_LOGPROBS = 20  # as OpenAI's chat API (its completions API allows 5)
ROLES = {"system", "user", "assistant", "tool"}


class ApiError(Exception):
    """A request refused: HTTP ``status`` and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {401: "authentication_error", 429: "rate_limit_error"}.get(
            status, "invalid_request_error" if 400 <= status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param, "invalid_value" if param else None)


@dataclass(frozen=True)
class Sampling:
    """The generation fields of a request, before the prompt is known."""

    max_tokens: int | None
    gen: GenerationConfig
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    n: int = 1
    logprobs: int | None = None  # top alternatives per token; None: no log-probabilities
    echo: bool = False


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise bad(f"the request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


def _number(body: dict, name: str, low: float, high: float, default: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"{name} must be a number, got {json.dumps(value)[:40]}", name)
    if value < low or value > high or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise bad(f"{name} must be in {interval}, got {value}", name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{name} must be an integer, got {json.dumps(value)[:40]}", name)
    if value < low or (high is not None and value > high):
        raise bad(f"{name} must be at least {low}" + (f" and at most {high}" if high is not None else "")
                  + f", got {value}", name)
    return value


def _refuse_unless(body: dict, name: str, allowed: tuple, why: str) -> None:
    if name in body and body[name] not in allowed:
        raise bad(f"{name} is not supported by swarm api: {why}", name)


def parse_sampling(body: dict, eos_token_ids: tuple[int, ...], chat: bool, draft: str = "auto") -> Sampling:
    """The generation fields of a completion or chat body (``draft``: speculative decoding unless
    the body's own ``draft`` says otherwise, a field of swarm's). Raises :class:`ApiError` (400)."""
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body, name, -2.0, 2.0, 0.0) != 0.0:
            raise bad(f"{name} is not supported (swarm's penalty is multiplicative): send 0, or "
                      f"repetition_penalty (> 1 discourages repeats, as `swarm generate --repetition-penalty`)", name)
    n = _integer(body, "n", 1, MAX_CHOICES) or 1
    _refuse_unless(body, "best_of", (None, 1), "no server-side ranking of candidates (ask for n choices instead)")
    logprobs, echo = _logprobs(body, chat)
    least = 0 if echo else 1  # max_tokens 0 with echo: the prompt (and its log-probabilities) alone, as OpenAI's
    _refuse_unless(body, "suffix", (None, ""), "no insertion (suffix)")
    _refuse_unless(body, "logit_bias", (None, {}), "no logit bias")
    for name in ("tools", "functions"):
        _refuse_unless(body, name, (None, []), "no tool calls")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad("response_format is not supported by swarm api: only plain text", "response_format")

    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    given = [_integer(body, name, least) for name in names]  # every one is checked, the first given is taken
    max_tokens = next((v for v in given if v is not None), None)
    temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0, low_open=True)
    top_k = _integer(body, "top_k", 0) or 0
    repetition_penalty = _number(body, "repetition_penalty", 0.0, 100.0, 1.0, low_open=True)
    seed = _integer(body, "seed", 0, 2**64 - 1)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options must be an object", "stream_options")
    include_usage = (options or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad("stream_options.include_usage must be true or false", "stream_options")
    draft = body.get("draft", draft)
    if draft not in DRAFTS:
        raise bad(f"draft must be one of {', '.join(DRAFTS)}, got {json.dumps(draft)[:40]}", "draft")
    gen = GenerationConfig(
        max_new_tokens=max_tokens or 1,  # the final value is set once the prompt's length is known
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        eos_token_ids=eos_token_ids,
        draft=draft,
    )
    return Sampling(max_tokens, gen, parse_stop(body.get("stop")), stream, include_usage, n, logprobs, echo)


def _flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"{name} must be true or false", name)
    return value


def _logprobs(body: dict, chat: bool) -> tuple[int | None, bool]:
    """(top alternatives per token or None for no log-probabilities, echo) as OpenAI's chat and
    completions APIs spell them."""
    if chat:
        if body.get("echo") not in (None, False):
            raise bad("echo is a field of completions, not of chat completions", "echo")
        wanted = _flag(body, "logprobs")
        top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if top and not wanted:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
        return (top or 0) if wanted else None, False
    value = body.get("logprobs")
    if isinstance(value, bool):  # the chat spelling, taken here too: true is 0 alternatives
        top = 0 if value else None
    else:
        top = _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    return top, _flag(body, "echo")


def parse_stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS:
        raise bad(f"stop takes at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise bad(f"every stop string must have 1 to {MAX_STOP_CHARS} characters", "stop")
    return tuple(stops)


def parse_prompt(value, vocab_size: int) -> str | list[int]:
    """A completion's ``prompt``: a string, or token ids; a list of one of them is taken as that
    one (a batch of several is refused: one choice per request)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise bad("prompt is empty: give some text to continue", "prompt")
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        if any(not 0 <= t < vocab_size for t in value):
            raise bad(f"prompt: token ids must be in [0, {vocab_size})", "prompt")
        return value
    if isinstance(value, list) and len(value) > 1:
        raise bad("prompt: one prompt per request (a string or a list of token ids)", "prompt")
    raise bad("prompt must be a non-empty string or list of token ids", "prompt")


def parse_messages(value) -> list[dict]:
    """A chat's ``messages`` as the chat template takes them: ``{"role", "content": str}``, with
    ``developer`` read as ``system`` and text parts joined."""
    if not isinstance(value, list) or not value:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    if len(value) > MAX_MESSAGES:
        raise bad(f"messages: at most {MAX_MESSAGES} messages, got {len(value)}", "messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"{where} must be an object with role and content", where)
        role = message.get("role")
        role = "system" if role == "developer" else role
        if role not in ROLES:
            raise bad(f"{where}.role must be one of {', '.join(sorted(ROLES | {'developer'}))}, got "
                      f"{json.dumps(role)[:40]}", f"{where}.role")
        out.append({"role": role, "content": _content(message.get("content"), f"{where}.content")})
    return out


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported", where)
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"{where} must be a string or a list of text parts", where)
