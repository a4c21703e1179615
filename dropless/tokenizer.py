"""Tokenizers: raw UTF-8 bytes (vocab 256, the default) or a byte-level BPE trained with `tokenizers`.

Both expose the same small surface: `vocab_size`, `encode`, `decode`, `token_bytes` (for streaming
decode), `to_json` (stored in the run directory and in every checkpoint) and `to_hf_json` (the
tokenizer.json of an exported Hugging Face directory).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Iterator

import numpy as np

from dropless.errors import DroplessError


class ByteTokenizer:
    kind = "bytes"
    vocab_size = 256
    cuts = "anywhere"   # where a long text may be cut with the same ids as whole (text_pieces)

    def encode(self, text: str, special: bool = True) -> np.ndarray:   # bytes: no special tokens
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int], continuation: bool = False) -> str:
        """Ids past the bytes (a model's vocabulary larger than 256) have no text and are skipped,
        as ids past a BPE tokenizer's vocabulary are. Bytes have no space to strip, so a
        `continuation` decodes as a whole text does."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id]) if 0 <= token_id < 256 else b""

    def to_json(self) -> str:
        return json.dumps({"type": "bytes"})

    def to_hf_json(self) -> str:
        """The same tokenizer as a `tokenizers` one: a byte-level BPE without merges whose 256
        tokens are the bytes, token id = byte value."""
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

        tok = HFTokenizer(models.BPE(vocab=_byte_alphabet(), merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        return tok.to_str()


def _byte_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet: each byte is one printable character (printable ASCII and
    Latin-1 stand for themselves; the rest are shifted past 255). Returns char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    char_of = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in char_of)
    char_of.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return {c: b for b, c in char_of.items()}


class BPETokenizer:
    """A `tokenizers` tokenizer: the byte-level BPE `train_bpe` makes, or any tokenizer.json (a run
    converted from Hugging Face carries its own)."""

    kind = "bpe"

    def __init__(self, tok):
        # a tokenizer.json saved with truncation or padding on (from a pipeline) would cut every
        # document and prompt to its max_length and pad the rest: lengths are the caller's business
        tok.no_truncation()
        tok.no_padding()
        self.tok = tok
        # the largest id + 1 (ids of a hand-written vocab need not be contiguous): the embedding
        # rows the tokenizer can reach
        self.vocab_size = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self._byte_of = _byte_alphabet()
        self._byte_level = type(tok.decoder).__name__ == "ByteLevel"
        # added (special) tokens are stored as their text, not in the byte-level alphabet
        self._added = {i: t.content for i, t in tok.get_added_tokens_decoder().items()}
        # other decoders see a token after an anchor text that is then cut off: alone, SentencePiece's
        # decoder strips the token's leading space (every streamed word lost its space)
        try:
            self._anchor = tok.encode("a", add_special_tokens=False).ids
        except Exception:   # tokenizers' own error: "a" has no token and there is no unknown one
            self._anchor = []
        self._anchor_text = tok.decode(self._anchor)
        self._byte_fallback = getattr(tok.model, "byte_fallback", False)

    @functools.cached_property
    def cuts(self) -> str | None:
        """Where a long text may be cut with the same ids as whole (`text_pieces`): "lines" or
        nowhere (None)."""
        return "lines" if _cuts_at_lines(json.loads(self.tok.to_str())) else None

    def encode(self, text: str, special: bool = True) -> np.ndarray:
        """`special=False`: without the special tokens the tokenizer adds around a text (a
        Llama-style BOS), for a text that spells its own (a rendered chat template)."""
        return np.asarray(self.tok.encode(text, add_special_tokens=special).ids, dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self.tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int], continuation: bool = False) -> str:
        """The text of `ids`; ids the tokenizer lacks are skipped. A whole text decodes as
        `tokenizers` does, which for SentencePiece ("▁word") strips the text's first space. A
        `continuation` (new tokens after a prompt) decodes as its tokens stream, their
        `token_bytes` joined, so the space before its first word is kept."""
        if continuation or self._byte_level:
            return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")
        return self.tok.decode(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        """The token's exact bytes (for byte-level BPE; other tokenizers: its decoded text). An
        id the tokenizer lacks (a model's vocabulary padded past it) has none."""
        if not self._byte_level:
            piece = self.tok.id_to_token(token_id) or ""
            if self._byte_fallback and re.fullmatch("<0x[0-9A-F]{2}>", piece):   # alone: U+FFFD
                return bytes([int(piece[3:5], 16)])
            text = self.tok.decode([*self._anchor, token_id])
            if not text.startswith(self._anchor_text):
                text = self._anchor_text + self.tok.decode([token_id])
            return text[len(self._anchor_text):].encode()
        if token_id in self._added:
            return self._added[token_id].encode()
        piece = self.tok.id_to_token(token_id)
        if piece is None:
            return b""
        try:
            return bytes(self._byte_of[c] for c in piece)
        except KeyError:   # a piece outside the byte alphabet is its text, as `tokenizers` decodes it
            return piece.encode()

    def to_json(self) -> str:
        return self.tok.to_str()

    to_hf_json = to_json


Tokenizer = ByteTokenizer | BPETokenizer


def _cuts_at_lines(spec: dict) -> bool:
    """Whether a tokenizer.json tokenizes a text cut before a newline that follows a non-space
    into the same ids as whole: the GPT-2 byte-level pre-tokenizer (train_bpe's), whose regex
    (letters, digits, other non-space runs; whitespace runs that start at whitespace) never
    matches across such a cut and looks at nothing before a match, with no normalizer, no
    post-processor adding tokens to each text, and no added token holding a newline."""
    pre, post = spec.get("pre_tokenizer") or {}, spec.get("post_processor")
    return (spec.get("normalizer") is None and pre.get("type") == "ByteLevel"
            and pre.get("use_regex") is True and pre.get("add_prefix_space") is False
            and (post is None or post.get("type") == "ByteLevel")
            and not any("\n" in t.get("content", "") for t in spec.get("added_tokens") or ()))


# characters tokenized per encode_chunks chunk: `tokenizers` holds 140-900 bytes per character of
# a chunk while it encodes (offsets, token strings, alignments); the bytes tokenizer 8 (int64 ids)
ENCODE_CHUNK_CHARS = 1 << 20
# data preparation's bars (rendering, tokenizing) appear only once it has taken this long: a
# small corpus, or an error found early, leaves no bar behind on stderr
BAR_DELAY_S = 2.0


def delayed_bar(iterable=None, desc: str | None = None, **kwargs):
    """A tqdm bar on stderr for long work (data preparation, reading and writing weights): it
    appears only once the work has taken BAR_DELAY_S and leaves nothing behind when done."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc, leave=False, dynamic_ncols=True, delay=BAR_DELAY_S, **kwargs)


def encode_chunks(tokenizer: "Tokenizer", texts: Iterable[str | Iterable[str]], bar=None
                  ) -> Iterator[list[tuple[int, np.ndarray]]]:
    """The ids of `texts`, a chunk of about ENCODE_CHUNK_CHARS characters at a time: per chunk,
    (index of the text, ids of it or of a piece of it), in order. A text is a str or an iterable
    of its consecutive blocks (a file's, read from disk: dropless.split.Span). A large corpus is
    never held as token ids all at once, nor is one large text: it is cut into pieces where its
    tokenizer has no token across the cut (`text_pieces`), else tokenized whole. `bar` (a tqdm
    counting characters, or None) follows it. The ids are the same however the texts are
    chunked or given in blocks."""
    batch, owners, size = [], [], 0
    for i, text in enumerate(texts):
        for piece in text_pieces(tokenizer, text):
            batch.append(piece)
            owners.append(i)
            size += len(piece)
            if size >= ENCODE_CHUNK_CHARS:
                yield list(zip(owners, tokenizer.encode_batch(batch)))
                if bar is not None:
                    bar.update(size)
                batch, owners, size = [], [], 0
    if batch:
        yield list(zip(owners, tokenizer.encode_batch(batch)))
        if bar is not None:
            bar.update(size)


def text_pieces(tokenizer: "Tokenizer", text: str | Iterable[str]) -> Iterator[str]:
    """`text` (a str, or its consecutive blocks) in pieces of about ENCODE_CHUNK_CHARS whose ids,
    joined, are the whole text's, cut where `tokenizer.cuts` allows: "anywhere" (the bytes);
    "lines" (a GPT-2-style byte-level BPE) before a newline that follows a non-space, where its
    pre-tokenizer always starts a new token; None (normalizers, prefixes, special tokens around
    each text): the text whole. The pieces are the same however the text comes in blocks: a
    block is held until a cut may follow it, so only a stretch with no cut is ever held whole."""
    cuts = getattr(tokenizer, "cuts", None)
    # buf[start:]: not yet yielded; held: blocks after it; no newline in buf before `look` is a cut
    buf, start, look, held = "", 0, 0, []
    for block in (text,) if isinstance(text, str) else text:
        held.append(block)
        if not cuts or (cuts == "lines" and "\n" not in block):
            continue
        rest = buf[start:]   # join's one item is itself: a whole text alone is not copied
        buf = "".join([rest, *held] if rest else held)
        look, start, held = max(look - start, 0), 0, []
        while len(buf) - start > ENCODE_CHUNK_CHARS:
            at = start + ENCODE_CHUNK_CHARS
            if cuts == "lines":
                at = buf.find("\n", max(at, look))
                while at > 0 and buf[at - 1].isspace():   # (a superset of the regex's \s)
                    at = buf.find("\n", at + 1)
                if at < 0:
                    look = len(buf)
                    break
            yield buf[start:at]
            start = at
    yield "".join(([buf[start:]] if len(buf) > start else []) + held)


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """Byte-level BPE: every byte is in the base alphabet, so any text encodes (no unknown token)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    if not 256 < vocab_size <= 1 << 20:
        raise DroplessError(f"--vocab {vocab_size} is invalid: a byte-level BPE needs "
                            "257 <= vocab <= 1048576")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tok)


@functools.cache
def _byte_level_spec() -> dict:
    return json.loads(ByteTokenizer().to_hf_json())


def tokenizer_from_json(text: str) -> Tokenizer:
    """ValueError (one line) for anything but a dropless or `tokenizers` tokenizer JSON."""
    try:
        spec = json.loads(text)
    except (ValueError, RecursionError) as err:   # RecursionError: nested too deep
        raise ValueError(f"not a tokenizer: invalid JSON ({err})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"not a tokenizer: a JSON {type(spec).__name__}, not an object")
    if spec.get("type") == "bytes" or spec == _byte_level_spec():
        return ByteTokenizer()   # what save_hf_dir writes for it: the same ids (and cache key)
    from tokenizers import Tokenizer as HFTokenizer
    try:
        tok = HFTokenizer.from_str(text)
    except Exception as err:   # tokenizers raises its own Exception type
        raise ValueError(f"not a tokenizer that `tokenizers` reads: {err}") from None
    if tok.get_vocab_size() == 0:
        raise ValueError("not a tokenizer: its vocabulary is empty")
    return BPETokenizer(tok)
