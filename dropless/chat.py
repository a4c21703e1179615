"""`dropless chat RUN_DIR|HF_DIR`: a conversation in the terminal. Each line read is a user's
message; the model's reply (its chat template, its EOS) streams to stdout and joins the history
that the next turn renders. When the history no longer fits the context with --max-new-tokens,
the oldest turns are dropped (a system message stays). EOF, /exit or /quit ends it.
"""

from __future__ import annotations

import codecs
import sys

from dropless.errors import DroplessError

QUIT = ("/exit", "/quit")


def run_chat(model, tok, chat: tuple, args, lines=None, out=None, err=None) -> int:
    """chat: (EOS ids, chat template, special tokens) of the model's directory."""
    from dropless.generate import generate
    from dropless.serve.chat_template import ChatRenderer, PromptTooLong
    from dropless.serve.text import DEFAULT_CHAT_TEMPLATE

    lines, out, err = lines or sys.stdin, out or sys.stdout, err or sys.stderr
    eos_ids, template, special = chat
    eos = () if args.ignore_eos else eos_ids
    context = model.cfg.max_seq_len
    renderer = ChatRenderer(template, special, 32 * context)
    head = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    interactive = lines is sys.stdin and sys.stdin.isatty()
    if lines is sys.stdin and hasattr(lines, "reconfigure"):
        lines.reconfigure(errors="replace")   # bytes that are not UTF-8: U+FFFD, no traceback

    def prompt_ids() -> list[int] | None:
        """The history rendered and encoded; None when it renders past every context."""
        try:
            text = renderer.render(head + history)
        except PromptTooLong:
            return None
        except ValueError as e:   # the template raised
            raise DroplessError(f"{args.run_dir}: the chat template failed: {e}") from None
        return tok.encode(text, template == DEFAULT_CHAT_TEMPLATE).tolist()

    def too_long(ids) -> bool:
        return ids is None or len(ids) + args.max_new_tokens > context

    turn = 0
    try:
        while True:
            if interactive:
                print("> ", end="", file=err, flush=True)
            if not (line := lines.readline()):   # EOF
                break
            # a lone surrogate (a terminal's undecodable byte) has no UTF-8: "?" instead
            message = line.rstrip("\n").encode("utf-8", "replace").decode("utf-8")
            if message.strip() in QUIT:
                break
            if not message.strip():
                continue
            history.append({"role": "user", "content": message})
            ids = prompt_ids()
            while too_long(ids) and len(history) > 1:
                del history[:2]   # the oldest user message and its reply
                ids = prompt_ids()
            if too_long(ids):
                size = "too many" if ids is None else len(ids)
                print(f"dropless: this message ({size} tokens with the template) + "
                      f"--max-new-tokens {args.max_new_tokens} exceeds the model's context of "
                      f"{context} tokens: not sent", file=err, flush=True)
                history.clear()
                continue
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

            def stream(row: int, token: int) -> None:
                if token not in eos:
                    print(decoder.decode(tok.token_bytes(token)), end="", file=out, flush=True)

            [new] = generate(model, [ids], args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p,
                             seed=None if args.seed is None else args.seed + turn,
                             eos_id=eos or None, on_token=stream, compile=args.compile)
            print(decoder.decode(b"", final=True), file=out, flush=True)
            history.append({"role": "assistant",
                            "content": tok.decode([t for t in new if t not in eos],
                                                  continuation=True)})
            turn += 1
    finally:
        renderer.close()
    return 0
