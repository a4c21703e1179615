"""Building a token cache entry (dropless.data.load_tokens), side by side: tokenized and written
a chunk at a time (the default, dropless.tokenizer.ENCODE_CHUNK_CHARS) against the whole corpus as
one chunk (every split's ids in memory at once, as before round 28). Each setting runs in its own
process, so its peak resident memory is its own. `--one-file`: the corpus as one document (one
big text file), which before round 31 was tokenized whole in either setting; now in pieces.
`--on-disk`: that one file written to disk and read as `--data` is (dropless.documents), the
entry built (a cache miss) then loaded again (a hit), each in its own process.

    python benchmarks/token_cache.py                          # stdlib corpus x3, bytes and BPE
    python benchmarks/token_cache.py --copies 1 --tokenizers byte --json out.json
    python benchmarks/token_cache.py --one-file --copies 3    # one document of every stdlib file
    python benchmarks/token_cache.py --one-file 20000000       # its first 20 M characters
    python benchmarks/token_cache.py --one-file --copies 10 --on-disk --tokenizers byte

Per setting: characters, tokens, seconds, million characters per second, and the peak resident
memory (MB) after the documents were read and while tokenizing, and the growth per character.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ONE_CHUNK = 1 << 62


def one(tokenizer: str, copies: int, chunk: int, vocab: int, one_file: int) -> dict:
    """Runs in the child: read, (train BPE,) then build the entry and measure."""
    from dropless import data, tokenizer as tokenizers
    from dropless.documents import stdlib_documents

    docs = [(f"{i}/{name}", text) for i in range(copies) for name, text in stdlib_documents()]
    if tokenizer == "bpe":
        tok = tokenizers.train_bpe([text for _, text in docs[:300]], vocab)
    else:
        tok = tokenizers.ByteTokenizer()
    if one_file:
        docs = [("corpus.txt", data.DOC_SEPARATOR.join(text for _, text in docs)[:one_file])]
    tokenizers.ENCODE_CHUNK_CHARS = chunk
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        tokens = data.load_tokens(docs, tok, Path(cache))
        n = len(tokens.train) + len(tokens.val)
        del tokens
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    chars = sum(len(text) for _, text in docs)
    return {"tokenizer": tokenizer, "chunk": "one chunk" if chunk == ONE_CHUNK else f"{chunk:,}",
            "chars": chars, "tokens": n, "seconds": seconds, "mchars_per_s": chars / seconds / 1e6,
            "rss_read_mb": before, "rss_peak_mb": peak,
            "growth_bytes_per_char": (peak - before) * 1e6 / chars}


def from_disk(path: str, tokenizer_json: str, cache: str) -> dict:
    """Runs in the child: read `path` as --data, then load (build or reuse) its cache entry."""
    from dropless import data
    from dropless.tokenizer import tokenizer_from_json

    tok = tokenizer_from_json(Path(tokenizer_json).read_text())
    start = time.perf_counter()
    docs = data.read_documents(path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    hit = Path(cache).exists() and any(Path(cache).iterdir())
    tokens = data.load_tokens(docs, tok, Path(cache))
    n = len(tokens.train) + len(tokens.val)
    del tokens
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    chars = len(Path(path).read_bytes().decode("utf-8", errors="replace"))
    return {"tokenizer": tok.kind, "chunk": "hit" if hit else "miss", "chars": chars,
            "tokens": n, "seconds": seconds, "mchars_per_s": chars / seconds / 1e6,
            "rss_read_mb": before, "rss_peak_mb": peak,
            "growth_bytes_per_char": (peak - before) * 1e6 / chars}


def _on_disk_rows(args, folder: Path) -> list[dict]:
    """The one-file corpus written into `folder`, then per tokenizer a miss and a hit."""
    import sysconfig

    from dropless import data, tokenizer as tokenizers

    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_bytes().decode("utf-8", errors="replace") for p in sorted(root.rglob("*.py"))
             if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    path = folder / "corpus.txt"
    with open(path, "w", encoding="utf-8") as f:
        left = args.one_file
        for _ in range(args.copies):
            for text in texts:
                f.write(text[:left] + data.DOC_SEPARATOR[:max(0, left - len(text))])
                left -= len(text) + len(data.DOC_SEPARATOR)
                if left <= 0:
                    break
    rows = []
    for name in args.tokenizers:
        tok = (tokenizers.train_bpe(texts[:300], args.vocab) if name == "bpe"
               else tokenizers.ByteTokenizer())
        (folder / "tokenizer.json").write_text(tok.to_json())
        for _ in ("miss", "hit"):
            out = subprocess.run([sys.executable, __file__, "--from-disk", str(path),
                                  str(folder / "tokenizer.json"), str(folder / f"cache-{name}")],
                                 capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--copies", type=int, default=3, help="copies of the stdlib corpus")
    p.add_argument("--tokenizers", nargs="+", default=["byte", "bpe"], choices=["byte", "bpe"])
    p.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary")
    p.add_argument("--one-file", type=int, nargs="?", const=ONE_CHUNK, default=0, metavar="CHARS",
                   help="the corpus as one document (its first CHARS characters)")
    p.add_argument("--on-disk", action="store_true",
                   help="--one-file written to disk, read as --data: a cache miss, then a hit")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--from-disk", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one(args.child[0], args.copies, int(args.child[1]), int(args.child[2]),
                             args.one_file)))
        return
    if args.on_disk and not args.one_file:
        p.error("--on-disk needs --one-file")
    if args.from_disk:
        print(json.dumps(from_disk(*args.from_disk)))
        return
    from dropless.tokenizer import ENCODE_CHUNK_CHARS

    rows = []
    if args.on_disk:
        with tempfile.TemporaryDirectory() as folder:
            rows = _on_disk_rows(args, Path(folder))
    for tok in args.tokenizers * (not args.on_disk):
        for chunk in (ENCODE_CHUNK_CHARS, ONE_CHUNK):
            out = subprocess.run([sys.executable, __file__, "--copies", str(args.copies),
                                  "--child", tok, str(chunk), str(args.vocab)]
                                 + ["--one-file", str(args.one_file)] * bool(args.one_file),
                                 capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print("| tokenizer | chunk (chars) or cache | M chars | M tokens | s | M chars/s | "
          "RSS read MB | RSS peak MB | growth B/char |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokenizer']} | {r['chunk']} | {r['chars'] / 1e6:.1f} | "
              f"{r['tokens'] / 1e6:.1f} | {r['seconds']:.1f} | {r['mchars_per_s']:.2f} | "
              f"{r['rss_read_mb']:.0f} | {r['rss_peak_mb']:.0f} | "
              f"{r['growth_bytes_per_char']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
