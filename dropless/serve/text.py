"""Text around the engine: loading a model directory for serving (tokenizer, EOS, chat template),
chat prompts, incremental detokenisation with stop strings, and log-probabilities in OpenAI's
shapes.
"""

from __future__ import annotations

import codecs
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dropless.errors import DroplessError
from dropless.files import need_dir, read_json_object, read_small_text, write_atomic
from dropless.model import Transformer
from dropless.tokenizer import Tokenizer

# The chat prompt when the model directory has no chat template: one "role: content" line per
# message, then "assistant:" for the model to continue.
DEFAULT_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")


@dataclass
class ServedModel:
    name: str
    model: Transformer
    tokenizer: Tokenizer
    eos_ids: tuple[int, ...]
    chat_template: str
    special_tokens: dict   # bos_token / eos_token strings the template may use


def _read_json(root: Path, name: str) -> dict:
    """root/name's JSON object, {} when there is none; a symlink out of `root` is refused."""
    path = root / name
    return read_json_object(path, root) if path.exists() else {}


def _token_text(value, where: str) -> str:
    text = value.get("content", "") if isinstance(value, dict) else (value or "")
    if not isinstance(text, str):
        raise DroplessError(f"{where}: must be a string or {{\"content\": string}}, got {value!r}")
    return text


def _eos_ids(eos, vocab_size: int, where: str) -> tuple[int, ...]:
    """EOS ids as token ids of the model: an id that is not one would never stop a request."""
    ids = eos if isinstance(eos, list) else ([] if eos is None else [eos])
    for i in ids:
        if type(i) is not int or not 0 <= i < vocab_size:
            raise DroplessError(f"{where}: eos_token_id={eos!r} is invalid: an id or a list of ids "
                                f"in [0, {vocab_size})")
    return tuple(ids)


def _chat_template(value, where: str) -> str:
    """A template string, or Hugging Face's list of named ones (the "default", else the first)."""
    if isinstance(value, list) and value and all(
            isinstance(t, dict) and isinstance(t.get("template"), str) for t in value):
        return next((t["template"] for t in value if t.get("name") == "default"),
                    value[0]["template"])
    if not isinstance(value, str):
        raise DroplessError(f"{where}: chat_template must be a string or a list of "
                            f'{{"name", "template"}} objects, got {type(value).__name__}')
    return value


def decode_dtype(device: torch.device) -> torch.dtype:
    """What generate, chat and serve decode in: bf16 on CUDA (the decode kernels' dtype, half
    the memory of float32), else float32."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def served_name(root: Path) -> str:
    """The model's id: its directory's name as given (a link's, not its target's); a Hugging Face
    cache snapshot (.../models--org--name/snapshots/<revision>) is org/name, not the revision."""
    path = Path(os.path.abspath(root))
    repo = path.parent.parent.name
    if path.parent.name == "snapshots" and repo.startswith("models--"):
        return repo.removeprefix("models--").replace("--", "/")
    return path.name


def load_served_model(path: str, device: torch.device) -> ServedModel:
    """A `dropless train` run directory or a Hugging Face model directory, with what
    `chat_metadata` reads."""
    from dropless.checkpoint import load_model_dir
    from dropless.serve.moe_decode import kmajor_experts

    need_dir(path, "run or Hugging Face directory")
    root = Path(path)
    model, tokenizer = load_model_dir(root, device, decode_dtype(device))
    kmajor_experts(model)   # the decode GEMVs' layout: served weights are never trained
    eos_ids, template, special = chat_metadata(root, model.cfg.vocab_size, tokenizer)
    return ServedModel(root.resolve().name, model.eval(), tokenizer, eos_ids, template, special)


def chat_files(root: Path) -> tuple[str, dict]:
    """(chat template, special tokens) of a model directory: tokenizer_config.json's
    `chat_template` (else DEFAULT_CHAT_TEMPLATE) and its bos_token and eos_token strings."""
    tok_config = _read_json(Path(root), "tokenizer_config.json")
    tok_path = Path(root) / "tokenizer_config.json"
    special = {k: _token_text(tok_config.get(k), f"{tok_path}: {k}")
               for k in ("bos_token", "eos_token")}
    return (_chat_template(tok_config.get("chat_template") or DEFAULT_CHAT_TEMPLATE, tok_path),
            special)


def chat_metadata(root: Path, vocab_size: int, tokenizer) -> tuple[tuple[int, ...], str, dict]:
    """(EOS ids, chat template, special tokens) of a model directory: `chat_files`' and the EOS
    ids, from generation_config.json, else config.json (`eos_token_id`, an id or a list), else
    the tokenizer config's eos_token."""
    root = Path(root)
    template, special = chat_files(root)
    tok_path, gen_path = root / "tokenizer_config.json", root / "generation_config.json"
    gen_config = _read_json(root, "generation_config.json")
    where = gen_path if "eos_token_id" in gen_config else root / "config.json"
    eos = gen_config.get("eos_token_id", _read_json(root, "config.json").get("eos_token_id"))
    if eos is None and special["eos_token"] and hasattr(tokenizer, "tok"):
        eos, where = tokenizer.tok.token_to_id(special["eos_token"]), f"{tok_path}: eos_token"
    return _eos_ids(eos, vocab_size, str(where)), template, special


# what `generate --chat` and `serve` read beside the weights (`chat_metadata`): EOS ids and chat
# template, carried along by convert, quantize and train --init
CHAT_FILES = ("generation_config.json", "tokenizer_config.json")


def copy_chat_files(src, dst: Path, vocab_size: int, tokenizer) -> None:
    """A model directory's chat files into `dst`, as they are, and its EOS ids into dst's
    generation_config.json where the source keeps them elsewhere (config.json, its tokenizer's
    eos_token): a run directory has no config.json, and a model that lost its EOS runs past it."""
    eos_ids = chat_metadata(src, vocab_size, tokenizer)[0]   # checks what it copies
    for name in CHAT_FILES:
        if (Path(src) / name).is_file():
            write_atomic(dst / name, read_small_text(Path(src) / name, Path(src)).encode())
    gen = _read_json(dst, "generation_config.json")
    if eos_ids and "eos_token_id" not in gen:
        write_atomic(dst / "generation_config.json",
                     json.dumps({**gen, "eos_token_id": list(eos_ids)}).encode())


def _advance(stop: str, fails: list[int], k: int, char: str) -> int:
    """A KMP matcher of `stop` that has matched its first k characters, given the next one: how
    many it has matched now. fails[k]: where to fall back to when the next is not stop[k]."""
    while k and stop[k] != char:
        k = fails[k]
    return k + 1 if stop[k] == char else 0


class TextStream:
    """Token ids -> text deltas, cut at the first stop string. Text that might be the start of a
    stop string is held back until it is not, so streamed deltas concatenate to exactly the
    non-streamed text. EOS tokens add no text.

    Each stop string has a KMP matcher fed the text as it comes (`matched[j]`: how many of stop
    string j's first characters the text ends with, the most held back for it). Its fallback table
    is built as far as the matcher gets, not up front (on the event loop), and skips the places
    that would fail on the same character (Knuth's: O(log len) a character at worst). Trying each
    place a stop string may start instead cost O(len^2) a token, on the engine's thread, after a
    long run of its first character."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str], eos_ids=()):
        self.tokenizer, self.stop, self.eos_ids = tokenizer, [s for s in stop if s], set(eos_ids)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""   # decoded, not yet sent: what is held back, then the new text
        self.sent = 0    # characters sent
        self.matched = [0] * len(self.stop)
        self.fails = [[0] for _ in self.stop]
        self.borders = [0] * len(self.stop)   # the longest proper border of stop[:len(fails) - 1]
        self.stopped = False

    def push(self, token: int) -> str:
        """The new text this token makes safe to send; sets `stopped` on a stop string."""
        new = len(self.text)
        if token not in self.eos_ids:
            self.text += self.decoder.decode(self.tokenizer.token_bytes(token))
        # the earliest start among the stop strings that complete in the new text
        cut = min((i for i in (self._feed(j, new) for j in range(len(self.stop))) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = self.text[:cut]
            return self._take(len(self.text))
        return self._take(len(self.text) - max(self.matched, default=0))

    @property
    def offset(self) -> int:
        """Characters decoded so far, sent or held back: where the next token's text begins (a
        completion's text_offset)."""
        return self.sent + len(self.text)

    def finish(self) -> str:
        """The held-back rest, once no more tokens come."""
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
        return self._take(len(self.text))

    def _feed(self, j: int, new: int) -> int:
        """Stop string j's matcher over text[new:] -> where its first match starts, else -1."""
        stop, fails, k = self.stop[j], self.fails[j], self.matched[j]
        for i in range(new, len(self.text)):
            k = _advance(stop, fails, k, self.text[i])
            if k == len(stop):
                return i + 1 - k
            if k == len(fails):   # this far the first time: fails[k], from stop[:k]'s border
                b = _advance(stop, fails, self.borders[j], stop[k - 1]) if k > 1 else 0
                fails.append(fails[b] if stop[b] == stop[k] else b)
                self.borders[j] = b
        self.matched[j] = k
        return -1

    def _take(self, end: int) -> str:
        delta, self.text = self.text[:end], self.text[end:]
        self.sent += end
        return delta


# ---- log-probabilities ------------------------------------------------------------------------
# An entry is one output token's (token, logprob, [(token, logprob)] most likely first, offset):
# the engine's Request.logprobs item with the token and its text_offset. The engine's thread makes
# them; the event loop shapes them, a token's text from a cache (a BPE token's bytes are a decode).
# An echoed prompt's first token has logprob and alternatives None: nothing predicts it.

Entry = tuple[int, float | None, list[tuple[int, float]] | None, int]


def prompt_offsets(tokenizer: Tokenizer, prompt: list[int]) -> list[int]:
    """Where each prompt token's text begins in the prompt's tokens decoded in turn (the echoed
    text, where the tokens spell it: a special token's text may not be the prompt's)."""
    decoder, size, out = codecs.getincrementaldecoder("utf-8")(errors="replace"), 0, []
    for token in prompt:
        out.append(size)
        size += len(decoder.decode(tokenizer.token_bytes(token)))
    return out


def prompt_entries(prompt: list[int], logprobs: list, offsets: list[int]) -> list[Entry]:
    """An echoed prompt's entries from the engine's Request.prompt_logprobs (tokens 1 on)."""
    return [(prompt[0], None, None, offsets[0])] + [
        (token, logprob, top, offset)
        for token, (logprob, top), offset in zip(prompt[1:], logprobs, offsets[1:])]


PIECES_CACHED = 1 << 16


def token_pieces(tokenizer: Tokenizer):
    """token id -> (its text, its bytes): the bytes decoded alone, an incomplete or invalid UTF-8
    sequence as U+FFFD (OpenAI's "bytes" let a client join the pieces of a character)."""
    @functools.lru_cache(maxsize=PIECES_CACHED)
    def piece(token: int) -> tuple[str, bytes]:
        raw = tokenizer.token_bytes(token)
        return raw.decode(errors="replace"), raw
    return piece


def chat_logprobs(entries: list[Entry], piece) -> dict:
    """A chat choice's logprobs: {"content": [{token, logprob, bytes, top_logprobs}], "refusal"}."""
    def one(token: int, logprob: float) -> dict:
        text, raw = piece(token)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}
    return {"content": [{**one(token, logprob), "top_logprobs": [one(*t) for t in top]}
                        for token, logprob, top, _ in entries], "refusal": None}


def completion_logprobs(entries: list[Entry], piece) -> dict:
    """A completion choice's logprobs: four lists, one item per token. A top_logprobs item maps
    text to logprob: two tokens of one text (bytes of no whole character: both U+FFFD) keep the
    likelier's, so it may hold fewer than asked; an echoed prompt's first token's is null."""
    tops = []
    for _, _, top, _ in entries:
        texts = {}
        for token, logprob in top or ():
            texts.setdefault(piece(token)[0], logprob)
        tops.append(None if top is None else texts)
    return {"tokens": [piece(e[0])[0] for e in entries],
            "token_logprobs": [e[1] for e in entries], "top_logprobs": tops,
            "text_offset": [e[3] for e in entries]}
