"""`dropless train --init SRC`: a run that starts from another model's weights and tokenizer (a
run directory, or a Hugging Face directory of an architecture `from_hf` reads) instead of a
preset's random ones: fine-tuning. The model's architecture is the source's (its vocabulary
included: the tokenizer may have fewer ids than the embedding), its expert backend and context
length the run's; the optimizer, schedule and data are the run's own, from step 0. The source is
read as `generate` reads it (every value checked before any weight), on the CPU in the dtype it
is stored in (a Hugging Face model in bf16: half of float32's bytes), by one process under
torchrun (rank 0: the others receive their shards from it); the run's parameters are float32
(bf16 under --precision bf16) once on its device. A quantized source is refused (train
its bf16 or fp32 original). Its EOS ids and chat template go into the run directory, so
`generate --chat` and `serve` treat the run as the source. A resumed run takes the architecture
from its own checkpoint: the source is not read again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dropless.config import PRESETS, ModelConfig, TrainConfig
from dropless.errors import DroplessError

# what a fine-tuning run takes where the flags leave it: a from-scratch learning rate (3e-3 for
# tiny) would wreck pretrained weights in a few steps
FINETUNE_TRAINING = dict(lr=2e-5)


QUANTIZED = ("holds a quantized model (packed int4 weights): it cannot be trained; start from "
             "the model it was quantized from")


@dataclass
class Source:
    """An --init source as every rank reads it: architecture, tokenizer and chat files. Its
    weights are read only when a model takes them (one rank under torchrun), never kept here."""
    path: str
    cfg: ModelConfig
    tokenizer: object
    chat: tuple   # (EOS ids, chat template, special tokens): dropless.serve.text.chat_metadata

    def read_weights(self) -> dict[str, torch.Tensor]:
        """The source's tensors on the host, in the dtype it stores (a run directory: as saved)."""
        from dropless.checkpoint import load_model_dir
        from dropless.hf import stored_dtype

        dtype = None
        if (Path(self.path) / "config.json").is_file():   # a HF model saved in bf16 stays bf16
            try:
                dtype = stored_dtype(self.path)
            except ValueError:   # load_model_dir says what is wrong with the files
                dtype = torch.float32
        weights = load_model_dir(self.path, "cpu", dtype)[0].state_dict()
        if any(not t.is_floating_point() for t in weights.values()):   # AWQ kept packed
            raise DroplessError(f"--init {self.path} {QUANTIZED}")
        return weights

    def take_model(self, cfg: ModelConfig):
        """A Transformer of `cfg` (the run's: the source's shapes) holding the source's tensors
        themselves, built on the meta device: the host holds one copy of the weights, not two."""
        from dropless.model import Transformer

        weights = self.read_weights()
        with torch.device("meta"):
            model = Transformer(cfg)
        model.load_state_dict(weights, strict=True, assign=True)
        if cfg.tie_embeddings:   # assign=True gives each key its own Parameter
            model.lm_head.weight = model.embed.weight
        return model


def load_source(path: str) -> Source:
    """The source's config, tokenizer and chat files, checked; no weight is read."""
    from dropless.checkpoint import model_dir_header
    from dropless.serve.text import chat_metadata

    cfg, tokenizer, quantized = model_dir_header(path)
    if quantized:
        raise DroplessError(f"--init {path} {QUANTIZED}")
    return Source(path, cfg, tokenizer, chat_metadata(path, cfg.vocab_size, tokenizer))


def base_config(cfg: TrainConfig, state: dict | None, source: Source | None) -> ModelConfig:
    """The architecture the run trains: the source's (a new --init run), the checkpoint's (a
    resumed --init run), else the preset's."""
    from dropless.checkpoint import config_from_dict

    if source is not None:
        return source.cfg
    if cfg.init is not None and state is not None:
        return config_from_dict(state["model_config"])
    return PRESETS[cfg.preset]


def run_config(cfg: TrainConfig, base: ModelConfig, vocab_size: int) -> ModelConfig:
    """The model config the run saves: the base with the run's context (at least its seq_len) and
    expert backend; a preset's vocabulary follows the tokenizer, a source's stays its own."""
    return replace(base, vocab_size=base.vocab_size if cfg.init else vocab_size,
                   max_seq_len=max(base.max_seq_len, cfg.seq_len),
                   moe=replace(base.moe, backend=cfg.backend))
