"""`.jsonl` training data: a line is {"text": ...}, a conversation {"messages": [...]} rendered
whole by a chat template in the server's sandbox (a template from a model directory is a
stranger's code), or a {"prompt": ..., "completion": ...} pair, both strings (the text is the one
then the other) or both message lists (one conversation).

With `--assistant-only-loss` the loss covers only what the assistant says: a conversation's
assistant turns, a pair's completion (its assistant turns). An assistant turn is found by
rendering: the conversation up to it with the generation prompt, then up to its end; the
characters between are its reply, the template's end-of-turn text (its EOS) included, so the
model learns to stop. A template that renders earlier turns differently once later ones follow (one that
drops past reasoning, say) has no such spans, and is refused. Text is then tokenized a piece at a
time (what the loss covers, what it skips): a BPE merge across a piece's edge is not made.
"""

from __future__ import annotations

import json

import numpy as np

from dropless.errors import DroplessError
from dropless.tokenizer import encode_chunks

# a conversation's rendered text may be this long (the sandboxed renderer's bound)
CHAT_CHARS = 1 << 24
# a target the loss skips (F.cross_entropy's ignore_index)
IGNORE = -100


class Rendered(str):
    """A document's text with the (start, end) character spans the loss covers (a conversation's
    assistant turns, a completion). A str: whatever reads documents' text (hashing, splitting,
    BPE training) reads it as it reads any other."""

    spans: tuple[tuple[int, int], ...]

    def __new__(cls, text: str, spans):
        rendered = super().__new__(cls, text)
        rendered.spans = tuple(spans)
        return rendered


def _messages(messages, field: str, where: str) -> list:
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages)):
        raise DroplessError(f'{where}: "{field}" must be a non-empty list of '
                            '{"role": string, "content": string} objects')
    return messages


def _clean(text: str) -> str:
    """A JSON escape may hold a lone surrogate ("\ud800", common in scraped text): no encoder
    takes it; U+FFFD, as for a file's bytes that are not UTF-8."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _record(record, where: str, assistant_only: bool, eos: str):
    """A line's text (a str or Rendered), or (messages, index of the first turn the loss may
    cover) of a conversation, rendered later. A completion string ends in `eos` (the model's
    EOS text, if any), so that the model learns to stop."""
    if not isinstance(record, dict):
        record = {}
    if record.get("messages") is not None:
        return _messages(record["messages"], "messages", where), 0
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        prompt = _clean(prompt)
        text = prompt + _clean(completion) + eos
        spans = [(len(prompt), len(text))] if len(text) > len(prompt) else []
        return Rendered(text, spans) if assistant_only else text
    if isinstance(prompt, list) or isinstance(completion, list):
        prompt, completion = (_messages(record.get(f), f, where) for f in ("prompt", "completion"))
        return prompt + completion, len(prompt)
    if not isinstance(record.get("text"), str):
        raise DroplessError(f'{where} has no "text" string field (nor "messages", nor "prompt" '
                            'and "completion")')
    return _clean(record["text"])


def jsonl_documents(name: str, text: str, shown: str, chat: tuple[str, dict] | None = None,
                    assistant_only: bool = False, progress: bool = False) -> list[tuple[str, str]]:
    """(name:line, text) of each record of a .jsonl file; conversations rendered by `chat` (a bar
    while they render, with `progress`)."""
    docs, conversations = [], []
    text = text.removeprefix("\ufeff")   # a UTF-8 BOM (Windows editors write one): not JSON
    # JSON Lines ends lines at "\n" alone: str.splitlines() would also cut a text at its raw
    # U+2028, NEL or \x1c (json.dumps(..., ensure_ascii=False) writes them as they are)
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as e:   # also: nested too deep, an int of 5000 digits
            raise DroplessError(f"{shown}: line {lineno} is not valid JSON "
                                f"({getattr(e, 'msg', e)})") from None
        doc = _record(record, f"{shown}: line {lineno}", assistant_only,
                      (chat or ("", {}))[1].get("eos_token") or "")
        if isinstance(doc, tuple):
            conversations.append((lineno, *doc))
            doc = None   # rendered below, all in one child
        docs.append((f"{name}:{lineno}", doc))
    if conversations:
        rendered = iter(render_all(conversations, chat, shown, assistant_only, progress))
        docs = [(n, next(rendered) if t is None else t) for n, t in docs]
    return docs


def _assistant_spans(render, messages: list, text: str, where: str,
                     first: int = 0) -> list[tuple[int, int]]:
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first:
            continue
        prompt, end = render(messages[:i], True), render(messages[:i + 1], False)
        if not (text.startswith(end) and end.startswith(prompt)):
            raise DroplessError(
                f"{where}: --assistant-only-loss cannot find assistant turn {i + 1}: the chat "
                "template renders the turns before it differently once later ones follow (or "
                "its generation prompt is not how the turn starts); train on whole "
                "conversations instead (without the flag)")
        spans.append((len(prompt), len(end)))
    return spans


def render_all(conversations: list, chat: tuple[str, dict] | None, shown: str,
               assistant_only: bool = False, progress: bool = False) -> list[str]:
    """Each (line number, messages, first) as the chat template (chat: (template, special
    tokens), default the plain one) renders it whole, no generation prompt; Rendered texts, with
    the spans of the assistant turns from messages[first] on, where `assistant_only`."""
    from dropless import tokenizer
    from dropless.serve.chat_template import ChatRenderer
    from dropless.serve.text import DEFAULT_CHAT_TEMPLATE

    template, special = chat or (DEFAULT_CHAT_TEMPLATE, {})
    renderer = ChatRenderer(template, special, CHAT_CHARS)
    texts = []
    try:
        for lineno, messages, first in tokenizer.delayed_bar(
                conversations, "render conversations", unit="conv", disable=not progress):
            where = f"{shown}: line {lineno}"
            try:
                text = renderer.render(messages, add_generation_prompt=False)
                if assistant_only:
                    text = Rendered(text, _assistant_spans(renderer.render, messages, text,
                                                           where, first))
            except DroplessError:   # a turn not found: its own message
                raise
            except ValueError as e:
                raise DroplessError(f"{where}: the chat template failed: {e}") from None
            texts.append(text)
    finally:
        renderer.close()
    return texts


def pieces(texts: list[str], separator: str) -> list[tuple[str, bool]]:
    """The texts joined by `separator`, as (text, in the loss) pieces: a Rendered text's assistant
    spans in, the rest of it and the separators out; any other text in whole."""
    out = []
    for i, text in enumerate(texts):
        if i:
            out.append((separator, False))
        spans = getattr(text, "spans", None)
        if spans is None:
            out.append((str(text), True))
            continue
        at = 0
        for start, end in spans:
            out += [(str(text[at:start]), False), (str(text[start:end]), True)]
            at = end
        out.append((str(text[at:]), False))
    return [p for p in out if p[0]]


def cut(pieces_: list[tuple[str, bool]], chars: int) -> tuple[list, list]:
    """The pieces' first `chars` characters, and the rest."""
    head, at = [], 0
    for i, (text, loss) in enumerate(pieces_):
        if at + len(text) >= chars:
            k = chars - at
            return head + [(text[:k], loss)], [(text[k:], loss)] + pieces_[i + 1:]
        head.append((text, loss))
        at += len(text)
    return head, []


def encode_stream(tokenizer, pieces_: list[tuple[str, bool]], bar=None):
    """(token ids, 1 where the loss covers the token) of the pieces, a chunk at a time
    (tokenizer.encode_chunks', `bar` too), each run of pieces with the same flag tokenized as one
    text."""
    runs = []
    for text, loss in pieces_:
        if runs and runs[-1][1] == loss:
            runs[-1][0] += text
        elif text:
            runs.append([text, loss])
    for pieces_ids in encode_chunks(tokenizer, [text for text, _ in runs], bar):
        yield (np.concatenate([np.asarray(ids, dtype=np.int64) for _, ids in pieces_ids]),
               np.concatenate([np.full(len(ids), runs[run][1], dtype=np.uint8)
                               for run, ids in pieces_ids]))



def loss_weights(batches, rt) -> list:
    """--assistant-only-loss: what each micro-batch's LM loss (a mean over its covered targets)
    is multiplied by, its share of the step's covered targets, every rank's counted (no host
    sync): the step's loss is then the mean over all of them, as one big batch's would be."""
    counts = [(y_BT != IGNORE).sum().float() for _, y_BT in batches]
    mean = rt.all_mean(sum(counts) / len(counts))
    return [count / mean.clamp(min=1) for count in counts]
