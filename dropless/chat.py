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
    from dropless.serve.chat_template import ChatRenderer
    from dropless.serve.text import DEFAULT_CHAT_TEMPLATE

    lines, out, err = lines or sys.stdin, out or sys.stdout, err or sys.stderr
    eos_ids, template, special = chat
    eos = () if args.ignore_eos else eos_ids
    context = model.cfg.max_seq_len
    renderer = ChatRenderer(template, special, 32 * context)
    head = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    interactive = lines is sys.stdin and sys.stdin.isatty()

    def prompt_ids() -> list[int]:
        try:
            text = renderer.render(head + history)
        except ValueError as e:   # the template raised, or rendered past its bounds
            raise DroplessError(f"{args.run_dir}: the chat template failed: {e}") from None
        return tok.encode(text, template == DEFAULT_CHAT_TEMPLATE).tolist()

    turn = 0
    try:
        while True:
            if interactive:
                print("> ", end="", file=err, flush=True)
            if not (line := lines.readline()):   # EOF
                break
            message = line.rstrip("\n")
            if message.strip() in QUIT:
                break
            if not message.strip():
                continue
            history.append({"role": "user", "content": message})
            ids = prompt_ids()
            while len(ids) + args.max_new_tokens > context and len(history) > 1:
                del history[:2]   # the oldest user message and its reply
                ids = prompt_ids()
            if len(ids) + args.max_new_tokens > context:
                print(f"dropless: this message ({len(ids)} tokens with the template) + "
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
