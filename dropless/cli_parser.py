"""The command line's arguments: `build_parser` (every command and flag), the train flags that
override a TrainConfig, and argparse types. `cli.py` runs the commands."""

from __future__ import annotations

import argparse
import dataclasses
import os

from dropless.config import BACKENDS, TrainConfig


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line instead of usage + error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _path(text: str) -> str:
    """An argparse type for paths: "" is the working directory to os and pathlib, so `convert
    --to-hf RUN ''` wrote into (over) whatever directory the command ran in."""
    if not text:
        raise argparse.ArgumentTypeError("must name a path, not ''")
    return text


# train flags: dest -> (type, help). All default to None so that only the flags given override the
# TrainConfig defaults (or a resumed run's saved config); help shows TrainConfig's defaults.
TRAIN_FLAGS = {
    "preset": (str, "model preset (see `dropless info`)"),
    "init": (str, "start from this run's or Hugging Face directory's weights and tokenizer "
                  "(fine-tuning; --lr then defaults to 2e-5); no --preset, --tokenizer, --vocab"),
    "data": (str, "text file, directory of text files, or .jsonl of 'text', 'messages' or "
                  "'prompt' + 'completion' lines (default: this Python's stdlib .py files)"),
    "val_data": (str, "validation text, in --data's forms (default: ~5%% of --data by document "
                      "name); given, all of --data trains"),
    "tokenizer": (str, "bytes (vocab 256) or bpe"),
    "vocab": (int, "BPE vocabulary size"),
    "steps": (int, "optimizer steps"),
    "batch_size": (int, "sequences per micro-batch"),
    "seq_len": (int, "tokens per sequence"),
    "grad_accum": (int, "micro-batches per optimizer step"),
    "lr": (float, "peak learning rate"),
    "warmup": (int, "linear warmup steps before the cosine decay"),
    "weight_decay": (float, "AdamW weight decay on non-embedding matrices"),
    "grad_clip": (float, "max global gradient norm, 0 = off"),
    "seed": (int, "seed of the initialization and of the batches"),
    "eval_every": (int, "validation every N steps"),
    "eval_batches": (int, "validation batches per evaluation"),
    "ckpt_every": (int, "checkpoint every N steps (and always at the end)"),
    "log_every": (int, "a metrics.jsonl line every N steps"),
    "device": (str, "auto (cuda when available), cpu, cuda, cuda:1, ..."),
    "backend": (str, f"MoE expert backend: {', '.join(BACKENDS)}"),
    "precision": (str, "auto (bf16-mixed on CUDA, fp32 on CPU), fp32, bf16-mixed (fp32 weights, "
                       "bf16 compute) or bf16 (pure bf16 weights)"),
    "cache_dir": (str, "token cache directory (default: ~/.cache/dropless/tokens, or "
                       "$XDG_CACHE_HOME/dropless/tokens where that is set)"),
    "sample_tokens": (int, "length of the sample generated at the end, 0 = none"),
    "ep": (int, "under torchrun: expert-parallel degree"),
    "dp_shard": (int, "under torchrun: FSDP degree (0 = world / (dp-replicate * ep))"),
    "dp_replicate": (int, "under torchrun: HSDP replicas"),
}
CACHE_HELP = ("token cache directory (default: ~/.cache/dropless/tokens, or $XDG_CACHE_HOME/"
              "dropless/tokens where that is set; never the run's saved one: a run directory may "
              "come from someone else)")
_DECODE_COMPILE = "torch.compile the decode step (slower start, faster steps)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dropless", description="Dropless MoE on PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("example", help="run one MoE layer on random tokens and print what it did")

    train = sub.add_parser("train", help="train a model; writes a run directory")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for dest, (kind, text) in TRAIN_FLAGS.items():
        if defaults[dest] is not None:
            text += f" (default {defaults[dest]})"
        train.add_argument("--" + dest.replace("_", "-"), dest=dest, type=kind, help=text)
    train.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the model and its loss (default: on for one CUDA "
                            "process, off on the CPU and under torchrun)")
    train.add_argument("--assistant-only-loss", action="store_true", default=None,
                       help="the loss covers only the assistant's turns of --data's "
                            "conversations (.jsonl 'messages', their end-of-turn included) "
                            "and the completions of its 'prompt' + 'completion' lines")
    train.add_argument("--out", help="run directory (default runs/<timestamp>)")
    train.add_argument("--resume", nargs="?", const="", metavar="RUN_DIR",
                       help="continue the run in RUN_DIR (or --out) from its checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    gen = sub.add_parser("generate", help="sample text from a trained run, streamed to stdout")
    gen.add_argument("run_dir", type=_path)
    gen.add_argument("--prompt", action="append", help="repeat for a batch of prompts "
                                                       "(default 'def ')")
    gen.add_argument("--max-new-tokens", type=int, default=200, help="per prompt (default 200)")
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--device", default="auto",
                     help="auto (cuda when available), cpu, ... (default auto)")
    gen.add_argument("--compile", action="store_true", help=_DECODE_COMPILE)
    gen.add_argument("--chat", action="store_true",
                     help="each prompt is a user's message in the model's chat template (its "
                          "tokenizer_config.json's, else a plain 'role: text' one); the reply "
                          "alone is printed")
    gen.add_argument("--ignore-eos", action="store_true",
                     help="generate past the model's EOS (default: a row stops there)")

    chat = sub.add_parser("chat", help="talk to a model in the terminal: each line a message, "
                                        "its reply streamed (/exit or EOF ends)")
    chat.add_argument("run_dir", type=_path, metavar="RUN_DIR|HF_DIR")
    chat.add_argument("--system", help="a system message first")
    chat.add_argument("--max-new-tokens", type=int,
                      help="per reply (default: 512, at most half the model's context)")
    chat.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    chat.add_argument("--top-k", type=int)
    chat.add_argument("--top-p", type=float)
    chat.add_argument("--seed", type=int, help="turn i samples with seed + i")
    chat.add_argument("--device", default="auto",
                      help="auto (cuda when available), cpu, ... (default auto)")
    chat.add_argument("--compile", action="store_true", help=_DECODE_COMPILE)
    chat.add_argument("--ignore-eos", action="store_true", help="reply past the model's EOS")

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the 'serve' extra)")
    srv.add_argument("model_dir", metavar="RUN_DIR|HF_DIR")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--max-batch", type=int, default=32, help="requests decoded together")
    srv.add_argument("--max-queue", type=int,
                     help="requests that may wait for a slot; past them a request is refused "
                          "with 429 (default 8 x --max-batch)")
    srv.add_argument("--max-len", type=int, help="context per request, preallocated for every "
                                                 "slot (default: the model's, at most 4096)")
    srv.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, ...")
    srv.add_argument("--compile", action="store_true", help=_DECODE_COMPILE)
    srv.add_argument("--compile-prefill", action=argparse.BooleanOptionalAction, default=None,
                     help="torch.compile the prompt forward once at start (default: on CUDA; an "
                          "eager one holds every running request for tens of ms)")
    srv.add_argument("--served-model-name", metavar="NAME",
                     help="the model id clients name (default: the directory's name)")
    srv.add_argument("--chat-template", metavar="FILE", type=_path,
                     help="a Jinja chat template to use instead of the model's (or the plain "
                          "default, for a model without one)")
    srv.add_argument("--api-key", default=os.environ.get("DROPLESS_API_KEY"),
                     help="every endpoint but /health and /metrics asks for 'Authorization: "
                          "Bearer KEY' (default: $DROPLESS_API_KEY, which other users cannot "
                          "read in ps)")
    srv.add_argument("--allowed-origins", metavar="ORIGINS", default="",
                     help="web pages whose scripts may call the API from a browser (CORS): "
                          "comma-separated origins such as http://localhost:3000, or * for any "
                          "(default: none)")
    srv.add_argument("--admit-delay-ms", type=float, default=2.0,
                     help="hold a new request up to this long so that requests arriving together "
                          "prefill as one batch (default 2)")

    conv = sub.add_parser("convert", help="checkpoints to and from one safetensors file or a "
                                          "Hugging Face directory",
                          usage="dropless convert RUN_DIR --to-safetensors OUT | "
                                "--from-hf HF_DIR OUT | --to-hf RUN_DIR OUT")
    conv.add_argument("path", type=_path,
                      help="RUN_DIR with --to-safetensors; the output directory otherwise")
    way = conv.add_mutually_exclusive_group(required=True)
    way.add_argument("--to-safetensors", metavar="OUT", type=_path,
                     help="write the run's latest checkpoint (any mesh) as one safetensors file "
                          "with every expert")
    way.add_argument("--from-hf", metavar="HF_DIR", type=_path,
                     help="read a Hugging Face model directory into a run directory")
    way.add_argument("--to-hf", metavar="RUN_DIR", type=_path,
                     help="write a run as a Hugging Face directory")
    conv.add_argument("--model-type", help="with --to-hf: HF architecture (default: inferred)")
    conv.add_argument("--dtype", choices=["float32", "bfloat16"],
                      help="with --to-hf or --to-safetensors: the weights' dtype (default float32, "
                           "as training saves them; bfloat16 halves the files, as most Hub "
                           "models are stored; the router's bias stays float32)")

    quant = sub.add_parser("quantize", help="AWQ int4 weights for the experts and attention; "
                                            "writes a quantized run directory")
    quant.add_argument("src", metavar="SRC", type=_path,
                       help="run directory or Hugging Face directory")
    quant.add_argument("--out", required=True, type=_path,
                       help="the quantized run directory (must not exist)")
    quant.add_argument("--bits", type=int, default=4, help="weight bits; 4 only (default 4)")
    quant.add_argument("--group-size", type=int, default=128,
                       help="32, 64 or 128 (default 128)")
    quant.add_argument("--calib-data", type=_path,
                       help="calibration text, as train's --data (default: this Python's stdlib "
                            ".py files); its training split is used")
    quant.add_argument("--calib-samples", type=int, default=128,
                       help="calibration sequences (default 128)")
    quant.add_argument("--calib-seq-len", type=int,
                       help="tokens per calibration sequence, at most the model's context "
                            "(default 512, or the model's max_seq_len where that is shorter)")
    quant.add_argument("--device", default="auto",
                       help="auto (cuda when available), cpu, ... (default auto)")
    quant.add_argument("--cache-dir", type=_path, help=CACHE_HELP)
    quant.add_argument("--quiet", action="store_true", help="no progress bar")

    ev = sub.add_parser("eval", help="validation loss and perplexity of a run or HF directory")
    ev.add_argument("path", metavar="RUN_DIR|HF_DIR", type=_path)
    ev.add_argument("--data", type=_path,
                    help="text to take the validation split from (default: the run's)")
    ev.add_argument("--json", action="store_true", help='print {"val_loss": ..., "val_ppl": ...} '
                                                       "(null where not finite: strict JSON)")
    ev.add_argument("--device", default="auto",
                    help="auto (cuda when available), cpu, cuda, cuda:1, ... (default auto)")
    ev.add_argument("--cache-dir", type=_path, help=CACHE_HELP)
    ev.add_argument("--seq-len", type=int, help="tokens per window (default: the run's; 128 for "
                                                "a Hugging Face directory; at most the model's "
                                                "context)")
    ev.add_argument("--batch-size", type=int, help="windows per batch (default: the run's; 16)")
    ev.add_argument("--eval-batches", type=int,
                    help="batches of windows spread evenly over the split (default: the run's; "
                         "8); 0 = the whole split, in consecutive windows")

    info = sub.add_parser("info", help="parameters, FLOPs and memory of a preset, a run directory "
                                       "or a HF directory (with neither: every preset, side by "
                                       "side); no weight is read")
    info.add_argument("path", nargs="?", type=_path, metavar="RUN_DIR|HF_DIR",
                      help="the model of a run directory (its latest checkpoint) or of a Hugging "
                           "Face directory (its config.json)")
    info.add_argument("--preset", help="one preset's model (see `dropless info` for the list)")
    info.add_argument("--seq-len", type=int, help="context for attention FLOPs (default: max)")
    return parser
