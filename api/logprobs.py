"""Log-probabilities in OpenAI's shapes, from the engine's :class:`~swarm.engine.generation.TokenLogprob`.

Completions: ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` (with ``echo``, the
prompt's tokens first, the very first with null log-probabilities: nothing comes before it to
predict it; offsets count characters from the start of the prompt, as OpenAI's do). Chat:
``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}],
"refusal": null}``. A token's text is its own decoding; ``bytes`` its UTF-8 bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from swarm.engine.generation import TokenLogprob

MAX_TOKEN_NAMES = 65536  # token texts remembered per request
LOOKBACK = 4  # tokens before one decoded with it to find its text (a leading space, a character's earlier bytes)


def stable(text: str) -> str:
    """``text`` without the replacement characters that end it (bytes of a character not complete yet)."""
    return text.rstrip("\ufffd")


class Logprobs:
    """One request's log-probability objects; ``decode(ids) -> str`` names the tokens."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self._names: dict[int, str] = {}

    def name(self, token: int) -> str:
        found = self._names.get(token)
        if found is None:
            found = self.decode([token])
            if len(self._names) < MAX_TOKEN_NAMES:
                self._names[token] = found
        return found

    def completion(self, entries: Sequence[TokenLogprob | int], offsets: Sequence[int]) -> dict:
        """``entries``: a token's :class:`TokenLogprob`, or its bare id where it has none (the
        prompt's first token); ``offsets``: where each token's text begins."""
        tokens, values, tops = [], [], []
        for entry in entries:
            if isinstance(entry, TokenLogprob):
                tokens.append(self.name(entry.token))
                values.append(entry.logprob)
                top: dict[str, float] = {}
                for token, value in entry.top:
                    top.setdefault(self.name(token), value)
                top.setdefault(self.name(entry.token), entry.logprob)  # as OpenAI's: the chosen token is among them
                tops.append(top)
            else:
                tokens.append(self.name(entry))
                values.append(None)
                tops.append(None)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": list(offsets)}

    def chat(self, entries: Sequence[TokenLogprob]) -> dict:
        return {"content": [self._chat_entry(e) for e in entries], "refusal": None}

    def _chat_entry(self, entry: TokenLogprob) -> dict:
        name = self.name(entry.token)
        return {"token": name, "logprob": entry.logprob, "bytes": list(name.encode()),
                "top_logprobs": [{"token": (n := self.name(t)), "logprob": v, "bytes": list(n.encode())} for t, v in entry.top]}

    def prompt(self, prompt_ids: Sequence[int], scored: Sequence[TokenLogprob]) -> tuple[list, list[int]]:
        """The echoed prompt's entries and offsets: its first token bare, then ``scored`` (the
        log-probabilities of the others). A token's offset is where its text begins in the
        prompt's decoding, found by decoding it with the few tokens before it (a linear pass,
        not a decoding of every prefix)."""
        entries: list[TokenLogprob | int] = [prompt_ids[0], *scored] if prompt_ids else []
        ids = list(prompt_ids)
        offsets, at = [], 0
        for i in range(len(ids)):
            offsets.append(at)
            lo = max(0, i - LOOKBACK)
            before = len(stable(self.decode(ids[lo:i]))) if i > lo else 0
            at += max(0, len(stable(self.decode(ids[lo : i + 1]))) - before)
        return entries, offsets
