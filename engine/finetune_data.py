"""Training data for fine-tuning: JSON lines in, right-padded batches with loss masks out.

Each line of a data file is one example, in one of three forms:

- ``{"text": "..."}``: a plain document; the loss covers every token.
- ``{"prompt": "...", "completion": "..."}``: the loss covers the completion only. The prompt is
  tokenized as ``swarm generate`` tokenizes a prompt, the completion on its own (so a completion
  starting with a space, ``" Paris."``, gives the tokens generation will produce after the prompt).
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: a conversation rendered by the model's
  chat template; the loss covers the assistant turns only. Their spans are found by rendering the
  conversation's prefixes (up to before each assistant turn, with the generation prompt; up to
  after it) and labelling the tokens whose characters fall between, so no template is parsed.

After text and completions the model's end-of-sequence token is appended (and learned), so a
trained model stops where its examples stop; a chat template ends assistant turns itself.

Reading (:func:`read_jsonl`) checks every line's form before anything heavy loads and raises
:class:`DataError` naming the file and line. Tokenizing (:func:`tokenize_records`) truncates
examples longer than ``max_length`` (counted) and drops those left with nothing to learn (counted).
:func:`collate` right-pads a batch, with labels ``-100`` on padding and unlearned positions, and
:func:`token_loss` is the summed next-token cross-entropy over the labelled positions, so nothing
but hidden states crosses the wire and padding needs no attention mask (attention is causal, so
padding on the right never reaches a real token).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

IGNORE = -100  # label of a position the loss skips (torch's cross_entropy ignore_index)
ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A data file that cannot be trained on; the message starts with ``FILE:LINE:`` (or ``FILE:``)."""


@dataclass(frozen=True)
class Record:
    """One checked line of a data file: ``kind`` is ``text``, ``completion`` or ``messages``."""

    line: int
    kind: str
    data: dict


@dataclass(frozen=True)
class Example:
    """A tokenized example: ``labels[i]`` is ``input_ids[i]`` where the loss learns that token,
    :data:`IGNORE` elsewhere (the model predicts ``labels[i]`` from positions ``< i``)."""

    input_ids: list[int]
    labels: list[int]
    line: int

    @property
    def num_targets(self) -> int:
        return sum(1 for label in self.labels[1:] if label != IGNORE)


@dataclass
class Dataset:
    """Tokenized examples of one file, with what tokenizing had to do to them."""

    path: Path
    examples: list[Example]
    truncated: int = 0  # examples cut to max_length
    dropped: int = 0  # examples with no token left to learn after the cut
    digest: str = field(default="")  # of the token ids and labels: what --resume checks

    def __post_init__(self):
        if not self.digest:
            h = hashlib.sha256()
            for ex in self.examples:
                h.update(json.dumps([ex.input_ids, ex.labels]).encode())
            self.digest = h.hexdigest()


@dataclass(frozen=True)
class Batch:
    """Right-padded ``input_ids`` and ``labels``, both ``[batch, seq]`` int64, and each row's
    real length ``[batch]``."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    lengths: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """Real (not padding) tokens: what tokens/s counts."""
        return int(self.lengths.sum())


def read_jsonl(path: str | Path) -> list[Record]:
    """Every example of the JSON-lines file ``path`` (blank lines skipped), checked for form only:
    no tokenizer or model is needed, so a bad file fails in a fraction of a second.

    Raises :class:`DataError` ``"FILE:LINE: what is wrong"`` for a line that is not a JSON object,
    lacks its fields or has them of the wrong type, ``"FILE: ..."`` for a missing, unreadable or
    empty file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the data file ({exc.strerror or exc})") from None
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark (utf-8-sig: Windows editors write one)
    records = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"{where}: not UTF-8 text") from None
        except ValueError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.args[0].split(':')[0]})") from None
        records.append(_check_record(obj, where, number))
    if not records:
        raise DataError(
            f"{path}: no examples (the file is empty); give JSON lines with "
            '{"text"}, {"prompt", "completion"} or {"messages"}'
        )
    return records


def _check_record(obj, where: str, number: int) -> Record:
    forms = '{"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [...]}'
    if not isinstance(obj, dict):
        raise DataError(f"{where}: each line must be a JSON object, one of {forms}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f'{where}: messages[{i}] must be an object with string "role" and "content"')
            if m["role"] not in ROLES:
                raise DataError(f"{where}: messages[{i}] has role {m['role']!r}; use one of {', '.join(ROLES)}")
        if not any(m["role"] == "assistant" and m["content"] for m in messages):
            raise DataError(f"{where}: no assistant message with content: nothing to learn")
        return Record(number, "messages", {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]})
    if "prompt" in obj or "completion" in obj:
        for key in ("prompt", "completion"):
            if key not in obj:
                raise DataError(f'{where}: has {"completion" if key == "prompt" else "prompt"!r} but no "{key}"')
            if not isinstance(obj[key], str):
                raise DataError(f'{where}: "{key}" must be a string, got {type(obj[key]).__name__}')
        if not obj["completion"]:
            raise DataError(f'{where}: "completion" is empty: nothing to learn')
        return Record(number, "completion", {"prompt": obj["prompt"], "completion": obj["completion"]})
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise DataError(f'{where}: "text" must be a non-empty string')
        return Record(number, "text", {"text": obj["text"]})
    keys = ", ".join(sorted(map(str, obj))) or "none"
    raise DataError(f"{where}: no known fields (has {keys}); each line must be one of {forms}")


def tokenize_records(
    records: Sequence[Record], tokenizer, path: str | Path, max_length: int, eos_id: int | None
) -> Dataset:
    """Tokenize checked records (see the module's docstring for the forms and their loss masks).

    Examples over ``max_length`` tokens are cut to it; those left with no label are dropped.
    Raises :class:`DataError` naming the line for a chat conversation when the tokenizer has no
    chat template (or its template fails on it), and naming the file when no example is left."""
    path = Path(path)
    examples, truncated, dropped = [], 0, 0
    for record in records:
        ids, labels = _tokenize(record, tokenizer, f"{path}:{record.line}", eos_id)
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            truncated += 1
        example = Example(ids, labels, record.line)
        if example.num_targets == 0:
            dropped += 1
            continue
        examples.append(example)
    if not examples:
        raise DataError(f"{path}: no example has a token to learn within --max-length {max_length}")
    return Dataset(path, examples, truncated, dropped)


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _tokenize(record: Record, tokenizer, where: str, eos_id: int | None) -> tuple[list[int], list[int]]:
    eos = [] if eos_id is None else [eos_id]
    if record.kind == "text":
        ids = _encode(tokenizer, record.data["text"], True) + eos
        return ids, list(ids)
    if record.kind == "completion":
        prompt = _encode(tokenizer, record.data["prompt"], True) if record.data["prompt"] else []
        completion = _encode(tokenizer, record.data["completion"], False) + eos
        return prompt + completion, [IGNORE] * len(prompt) + completion
    return _tokenize_chat(record.data["messages"], tokenizer, where)


def _tokenize_chat(messages: list[dict], tokenizer, where: str) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f'{where}: "messages" need a chat template, and this model\'s tokenizer has none')

    def render(part: list[dict], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(part, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja raises its own errors (e.g. "roles must alternate")
            raise DataError(f"{where}: the chat template fails on this conversation ({exc})") from None

    text = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = len(render(messages[:i], True)) if i else 0, len(render(messages[: i + 1], False))
        if not (text.startswith(render(messages[: i + 1], False)) and start <= end):
            raise DataError(
                f"{where}: this model's chat template renders the start of a conversation differently "
                "from the whole, so the assistant turns cannot be located; use prompt/completion lines"
            )
        spans.append((start, end))
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise DataError(f'{where}: "messages" need a fast tokenizer (tokenizer.json); use prompt/completion lines') from None
    ids = list(encoded["input_ids"])
    labels = [
        token if any(s <= first < e for s, e in spans) else IGNORE
        for token, (first, _) in zip(ids, encoded["offset_mapping"])
    ]
    return ids, labels


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad ``examples`` to their longest; padding gets ``pad_id`` and the label :data:`IGNORE`."""
    longest = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    for row, ex in enumerate(examples):
        ids[row, : len(ex.input_ids)] = torch.tensor(ex.input_ids)
        labels[row, : len(ex.labels)] = torch.tensor(ex.labels)
    return Batch(ids, labels, torch.tensor([len(ex.input_ids) for ex in examples]))


def with_virtual_tokens(labels: torch.Tensor, num_virtual: int) -> torch.Tensor:
    """Labels ``[batch, seq]`` for a sequence with ``num_virtual`` prompt positions prepended
    (ignored, as peft does: the last virtual position predicts the first real token's label)."""
    if not num_virtual:
        return labels
    return torch.cat([labels.new_full((labels.shape[0], num_virtual), IGNORE), labels], dim=1)


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of ``logits [batch, seq, vocab]`` against ``labels
    [batch, seq]`` (position ``i`` predicts ``labels[i + 1]``; :data:`IGNORE` skipped), and how
    many positions it summed. Divide by the count of the whole optimizer step for the mean loss."""
    targets = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets, ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())
