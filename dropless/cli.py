"""Command-line entry point: `dropless <command>` (also `python -m dropless`).

User mistakes raise DroplessError anywhere below; `main` prints them as one line on stderr and
returns a non-zero exit code, without a traceback.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import math
import os
import re
import sys
import time
import warnings

from dropless.cli_checks import chat_max_new_tokens, prompt_fits, require, sampling_flags
from dropless.cli_parser import TRAIN_FLAGS, build_parser
from dropless.config import LIMITS, PRESET_TRAINING, TrainConfig
from dropless.errors import DroplessError
from dropless.files import need_dir, new_dir
from dropless.precision import resolve_device


def _train(args) -> int:
    from dropless.checkpoint import refuse_if_in_use, resume_config
    from dropless.finetune import FINETUNE_TRAINING
    from dropless.runlog import StopWhenReaderLeaves, format_summary
    from dropless.train import train

    overrides = {dest: getattr(args, dest)
                 for dest in [*TRAIN_FLAGS, "compile", "assistant_only_loss"]
                 if getattr(args, dest) is not None}
    for dest in [k for k in ("data", "val_data", "cache_dir", "init") if overrides.get(k)]:
        overrides[dest] = os.path.abspath(overrides[dest])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = {k: overrides[k] for k in ("dp_replicate", "dp_shard", "ep") if k in overrides}
    if world == 1 and math.prod(v or 1 for v in layout.values()) > 1:   # not ignored silently
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in layout.items())
        raise DroplessError(f"{flags} needs several processes and this is one: start it with "
                            "torchrun --nproc-per-node N -m dropless train ...")
    if world > 1 and not (args.out or args.resume):
        raise DroplessError("under torchrun, pass --out RUN_DIR: every rank (and every restart) "
                            "must agree on the run directory")
    if args.resume is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        # torchrun --max-restarts restarted the job: continue from the last complete checkpoint
        # this job wrote; a run that was in --out before it started stays refused, as at first
        from dropless.parallel.checkpoint import latest, read_state
        path, job = latest(args.out), os.environ.get("TORCHELASTIC_RUN_ID")
        if path is not None and read_state(path).get("job") == job:
            args.resume = args.out
    made = None   # the default run directory, once this process has created it
    if args.resume is not None:
        run_dir = args.resume or args.out
        if not run_dir:
            raise DroplessError("--resume needs a run directory: --resume RUN_DIR")
        if args.resume and args.out and os.path.realpath(args.resume) != os.path.realpath(args.out):
            raise DroplessError(f"--resume {args.resume} and --out {args.out} name different "
                                "directories: a run continues where it is; pass one of them")
        need_dir(run_dir)
        if os.environ.get("RANK", "0") == "0":   # other ranks would find rank 0's claim
            refuse_if_in_use(run_dir)
        cfg, state = resume_config(run_dir, overrides)
    else:
        out = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")) if args.out is None else args.out
        if "init" in overrides and (given := [k for k in ("preset", "tokenizer", "vocab")
                                              if k in overrides]):
            raise DroplessError(f"--init takes the model and its tokenizer from {args.init}: "
                                f"leave out --{' --'.join(given)}")
        try:
            preset = overrides.get("preset", TrainConfig.preset)
            defaults = FINETUNE_TRAINING if "init" in overrides else PRESET_TRAINING.get(preset, {})
            cfg = TrainConfig(out=out, **{**defaults, **overrides})
        except ValueError as e:
            raise DroplessError(f"invalid training config: {e}") from None
        state = None
        if args.out is None:   # created here, -2, -3, ... if taken: runs of one second never share
            cfg = dataclasses.replace(cfg, out=(made := new_dir(out)))
    stdout, stderr = StopWhenReaderLeaves(sys.stdout), StopWhenReaderLeaves(sys.stderr)
    sys.stdout, sys.stderr = stdout, stderr
    try:
        summary = train(cfg, state=state, progress=not args.quiet)
        if os.environ.get("RANK", "0") == "0":   # under torchrun, rank 0 speaks for the run
            print(format_summary(summary), flush=True)
        if stdout.reader_left or stderr.reader_left:
            if not summary["finished"]:   # say why the run stopped, where someone may still read
                print(f"dropless: the output pipe closed: stopped at step {summary['step']}/"
                      f"{summary['steps']}, checkpoint saved; resume with: dropless train "
                      f"--resume {summary['run_dir']}", file=sys.stderr, flush=True)
            return 141   # as for `generate ... | head`: 128 + SIGPIPE
    finally:
        sys.stdout, sys.stderr = stdout.stream, stderr.stream
        if made is not None:   # a start that failed leaves no empty run directory (as with --out)
            with contextlib.suppress(OSError):   # not empty: the run
                os.rmdir(made)
    return 0 if summary["finished"] else 130


def _decode_model(args):
    """generate's and chat's (model, tokenizer, (EOS ids, chat template, special tokens)), in
    serve's dtype (bf16 on CUDA), the experts in the decode GEMVs' layout (on CUDA)."""
    from dropless.checkpoint import load_model_dir
    from dropless.serve.moe_decode import kmajor_experts
    from dropless.serve.text import chat_metadata, decode_dtype

    device = resolve_device(args.device)
    model, tok = load_model_dir(args.run_dir, device, decode_dtype(device))
    kmajor_experts(model)
    return model, tok, chat_metadata(args.run_dir, model.cfg.vocab_size, tok)


def _chat(args) -> int:
    from dropless.chat import run_chat
    from dropless.checkpoint import model_config_of

    sampling_flags(args)
    context = model_config_of(args.run_dir)[0].max_seq_len   # its header; no weight read
    args.max_new_tokens = chat_max_new_tokens(args.max_new_tokens, context)
    return run_chat(*_decode_model(args), args)


def _generate(args) -> int:
    from dropless.generate import generate
    from dropless.serve.chat_template import render_chat
    from dropless.serve.text import DEFAULT_CHAT_TEMPLATE

    sampling_flags(args)
    prompts = args.prompt or ["def "]   # argv's bytes that are not UTF-8: lone surrogates
    bad = [p for p in prompts if any("\ud800" <= c <= "\udfff" for c in p)]
    require(not bad, "--prompt", ascii(bad[:1])[1:-1], "must be UTF-8 text")
    model, tok, (eos_ids, template, special) = _decode_model(args)
    eos = () if args.ignore_eos else eos_ids
    if args.chat:   # each prompt a user's message; the reply alone is printed
        try:
            texts = [render_chat(template, [{"role": "user", "content": p}], special)
                     for p in prompts]
        except ValueError as e:   # the template raised or ran past its bounds
            raise DroplessError(f"{args.run_dir}: the chat template failed: {e}") from None
        # a model's template spells its own BOS (as the server encodes it)
        ids = [tok.encode(t, template == DEFAULT_CHAT_TEMPLATE).tolist() for t in texts]
    else:
        ids = [tok.encode(p).tolist() for p in prompts]
    if not all(ids):
        raise DroplessError("--prompt must not be empty")
    prompt_fits(max(map(len, ids)), args.max_new_tokens, model.cfg.max_seq_len)
    # one prompt streams; multi-byte characters may span tokens: decode incrementally
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    streaming, shown = len(prompts) == 1, [""] * len(prompts) if args.chat else prompts
    if streaming:
        print(shown[0], end="", flush=True)

    def on_token(row: int, token: int) -> None:
        if token not in eos:   # an EOS ends the row and has no text
            print(decoder.decode(tok.token_bytes(token)), end="", flush=True)

    start = time.perf_counter()
    outs = generate(model, ids, args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_id=eos or None,
                    on_token=on_token if streaming else None, compile=args.compile)
    elapsed = time.perf_counter() - start
    if streaming:
        print(decoder.decode(b"", final=True))
    else:
        for i, (prompt, out) in enumerate(zip(shown, outs)):
            text = tok.decode([t for t in out if t not in eos], continuation=True)
            print(f"--- [{i}] ---\n{prompt}{text}")
    num_new = sum(map(len, outs))
    sys.stdout.flush()   # the text before the stats, where both go to one terminal or file
    print(f"{num_new} tokens in {elapsed:.2f} s ({num_new / elapsed:.1f} tokens/s)", file=sys.stderr)
    return 0


def _serve(args) -> int:
    import importlib.util

    if not all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn")):
        raise DroplessError("dropless serve needs FastAPI and uvicorn: pip install 'dropless[serve]'")
    from dropless.ops.device import check_switches
    from dropless.serve.engine import Engine
    from dropless.serve.loop import check_listen
    from dropless.serve.server import QUEUE_PER_SLOT, serve
    from dropless.serve.text import load_served_model

    # what can be checked without the model, before it loads (minutes, for a large one)
    check_switches()
    require(args.max_batch >= 1, "--max-batch", args.max_batch, "must be >= 1")
    require(args.max_queue is None or args.max_queue >= 1, "--max-queue", args.max_queue,
            "must be >= 1")
    require(args.max_len is None or args.max_len >= 2, "--max-len", args.max_len,
            "must be in [2, the model's max_seq_len]")
    require(0 <= args.admit_delay_ms <= 1000, "--admit-delay-ms", args.admit_delay_ms,
            "must be in [0, 1000]")
    require(1 <= args.port <= 65535, "--port", args.port, "must be in [1, 65535]")
    require(args.api_key is None or args.api_key.strip() == args.api_key != "", "--api-key",
            "(hidden)", "must be a non-empty string without surrounding spaces")
    origins = tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip())
    require(all(o == "*" or re.fullmatch(r"https?://[^/\s]+", o) for o in origins),
            "--allowed-origins", args.allowed_origins, "must be * or comma-separated origins "
            "(scheme://host[:port], no path), e.g. http://localhost:3000")
    name = args.served_model_name
    require(name is None or 0 < len(name) <= 256 and name.isprintable(), "--served-model-name",
            ascii(name), "must be 1 to 256 printable characters")
    template = None
    if args.chat_template is not None:   # checked before the model loads: it renders once
        from dropless.files import read_small_text
        from dropless.serve.chat_template import render_chat
        template = read_small_text(args.chat_template)
        try:
            render_chat(template, [{"role": "user", "content": "hi"}], {})
        except ValueError as e:
            raise DroplessError(f"--chat-template {args.chat_template}: {e}") from None
    check_listen(args.host, args.port)
    served = load_served_model(args.model_dir, resolve_device(args.device))
    served.name, served.chat_template = name or served.name, template or served.chat_template
    compile_prefill = args.compile_prefill if args.compile_prefill is not None else (
        args.compile or next(served.model.parameters()).is_cuda)
    context = served.model.cfg.max_seq_len
    require(args.max_len is None or 2 <= args.max_len <= context, "--max-len", args.max_len,
            f"must be in [2, {context}] (the model's max_seq_len)")
    max_len = args.max_len or min(context, 4096)
    try:
        engine = Engine(served.model, max_batch=args.max_batch, max_len=max_len, compile=args.compile,
                        compile_prefill=compile_prefill, admit_delay=args.admit_delay_ms / 1e3)
    except ValueError as e:   # its "max_batch=0 is invalid" (or too large) in the flags' names
        raise DroplessError(re.sub("max_(batch|len)=", r"--max-\1 ", str(e))) from None
    max_queue = args.max_queue or QUEUE_PER_SLOT * args.max_batch
    print(f"serving {served.name!r} on http://{args.host}:{args.port}/v1 (max batch "
          f"{args.max_batch}, max queue {max_queue}, context {engine.max_len})", file=sys.stderr)
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host {args.host} without --api-key: whoever reaches the port uses the "
              "model", file=sys.stderr)
    serve(served, engine, args.host, args.port, max_queue, args.api_key, origins)
    return 0


def _convert(args) -> int:
    import torch

    from dropless.convert import convert_from_hf, convert_to_hf, convert_to_safetensors

    # the paths given the other way round (the source where the output goes): say which is which
    run_dir = args.to_hf or (args.path if args.to_safetensors else None)
    if run_dir is not None and not os.path.isdir(run_dir):
        hint = ""
        if args.to_hf and os.path.isdir(args.path) and os.listdir(args.path):
            hint = (f" (--to-hf takes the run, the other path is the output: `dropless convert "
                    f"--to-hf {args.path} {run_dir}`)")
        elif args.to_safetensors and os.path.isdir(args.to_safetensors):
            hint = (f" (the run comes first, --to-safetensors takes the output file: `dropless "
                    f"convert {args.to_safetensors} --to-safetensors {args.path}`)")
        need_dir(run_dir, hint=hint)
    if args.from_hf and not os.path.exists(args.from_hf) and \
            os.path.isfile(os.path.join(args.path, "config.json")):
        raise DroplessError(f"{args.from_hf}: no such Hugging Face directory (--from-hf takes it, "
                            f"the other path is the output: `dropless convert --from-hf "
                            f"{args.path} {args.from_hf}`)")
    out = args.to_safetensors or args.path   # never overwrite what convert did not write
    if args.to_safetensors:   # else safetensors' own I/O error, naming its temp file
        need_dir(os.path.dirname(os.path.abspath(out)), "directory", f" for {out}")
    if args.to_safetensors and os.path.lexists(out):
        raise DroplessError(f"{out} already exists: refusing to overwrite it; choose a new path")
    if not args.to_safetensors and os.path.lexists(out) and (
            not os.path.isdir(out) or os.listdir(out)):
        raise DroplessError(f"{out} already exists and is not an empty directory: refusing to "
                            "overwrite it; choose a new directory")
    if args.dtype and args.from_hf:
        raise DroplessError("--dtype is invalid with --from-hf: a run directory holds float32 "
                            "(training's weights); it applies to --to-hf and --to-safetensors")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype)
    try:
        if args.to_safetensors:
            n = convert_to_safetensors(args.path, args.to_safetensors, dtype)
            print(f"wrote {n} tensors to {args.to_safetensors}")
            return 0
        if args.from_hf:
            convert_from_hf(args.from_hf, args.path)
        else:
            convert_to_hf(args.to_hf, args.path, args.model_type, dtype)
    except ValueError as e:   # the HF reader's errors name what is wrong; one line, no traceback
        raise DroplessError(str(e)) from None
    print(f"wrote {args.path}")
    return 0


def _quantize(args) -> int:
    from dropless.quant.run import quantize_run

    need_dir(args.src, "run or Hugging Face directory")
    s = quantize_run(args.src, args.out, bits=args.bits, group_size=args.group_size,
                     calib_data=args.calib_data, calib_samples=args.calib_samples,
                     calib_seq_len=args.calib_seq_len, device=resolve_device(args.device),
                     progress=not args.quiet, cache_dir=args.cache_dir)
    print(f"wrote {s['out']}: {s['layers']} layers, experts {s['expert_bytes_int4'] / 2**20:.2f} MiB "
          f"int4 ({s['expert_bytes_int4'] / max(s['expert_bytes_bf16'], 1):.3f}x their bf16 bytes)")
    return 0


def _eval(args) -> int:
    from dropless.evaluate import WINDOW_FLAGS, evaluate_dir, result_json

    need_dir(args.path, "run or Hugging Face directory")
    r = evaluate_dir(args.path, args.data, args.device, args.cache_dir, progress=True,
                     windows={k: getattr(args, k) for k in WINDOW_FLAGS})
    if args.json:
        print(result_json(r))
    else:
        print(f"val loss {r['val_loss']:.4f} nats/token (perplexity {r['val_ppl']:.3f}) over "
              f"{r['tokens']:,} tokens")
    return 0


def _info(args) -> int:
    from dropless.config import PRESETS, get_preset
    from dropless.info import format_stats, model_stats, preset_table

    require(args.seq_len is None or 0 < args.seq_len <= LIMITS["positions"], "--seq-len",
            args.seq_len, f"must be in [1, {LIMITS['positions']}] (as train's)")
    if args.path is not None:
        from dropless.checkpoint import model_config_of
        require(args.preset is None, "--preset", args.preset, "give a preset or a directory, "
                 "not both")
        cfg, what = model_config_of(args.path)
        print(f"{args.path}: {what}\n{format_stats(model_stats(cfg, args.seq_len))}")
        return 0
    if args.preset is None:
        print(preset_table(PRESETS, args.seq_len))
        return 0
    try:
        cfg = get_preset(args.preset)
    except ValueError as e:
        raise DroplessError(str(e)) from None
    print(f"preset {args.preset}\n{format_stats(model_stats(cfg, args.seq_len))}")
    return 0


def _run(args) -> int:
    try:
        if args.command == "example":
            from dropless.example import run_example
            return run_example() or 0
        return {"train": _train, "generate": _generate, "chat": _chat, "info": _info,
                "convert": _convert, "serve": _serve, "quantize": _quantize,
                "eval": _eval}[args.command](args)
    except DroplessError as e:
        # under torchrun every local rank runs the same command line on the same files, so a user
        # mistake is the same on each: one line per machine (its local rank 0), not one per rank
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"dropless: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dropless: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:   # an OSError, but no error of the command's: main's to handle
        raise
    except OSError as e:   # disk full, read-only, a file where a directory should be, ...
        where = f"{e.filename}: " if e.filename else ""
        print(f"dropless: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    # generated text holds any character: a terminal or pipe that cannot spell one (an ASCII or
    # latin-1 locale, PYTHONIOENCODING=ascii) gets a replacement, not a UnicodeEncodeError traceback
    streams = {s: s.errors for s in (sys.stdout, sys.stderr) if hasattr(s, "reconfigure")}
    for stream in streams:
        stream.reconfigure(errors="replace")
    formatwarning = warnings.formatwarning   # one line per warning while a command runs
    warnings.formatwarning = lambda message, *_, **__: f"dropless: warning: {message}\n"
    try:
        try:
            return _run(build_parser().parse_args(argv))
        finally:   # --help and argparse's errors (SystemExit) included
            # what is still buffered is written now, where a closed pipe is caught below: the
            # interpreter's flush at exit reports it as "Exception ignored ... BrokenPipeError"
            # with exit code 120 (stdout into a pipe is block-buffered: `dropless info | true`)
            for stream in filter(None, (sys.stdout, sys.stderr)):   # None: `>&-`
                stream.flush()
    except BrokenPipeError:
        # `dropless ... | head` stopped reading, in any command or in an error message: stop
        # quietly, as `cat` or `yes` do, with the exit code a shell reports for a command that
        # SIGPIPE killed (128 + 13), so `set -o pipefail` scripts still see that output was lost;
        # Python's recipe (docs: signal, "Note on SIGPIPE"), not SIG_DFL, which would kill a
        # training run with its steps since the last checkpoint (train stops cleanly instead)
        from dropless.runlog import discard_closed_output
        discard_closed_output()
        return 141
    finally:   # main() called from Python leaves the caller's warnings and streams as they were
        warnings.formatwarning = formatwarning
        for stream, errors in streams.items():
            stream.reconfigure(errors=errors)


if __name__ == "__main__":
    sys.exit(main())
