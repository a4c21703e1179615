"""Inference: a decode engine over a preallocated KV cache (CUDA-graph decode steps, continuous
batching) and an OpenAI-compatible HTTP server (`dropless serve`). Importing this package imports
neither FastAPI nor uvicorn: the server module loads them when it is used."""

from dropless.serve.engine import Engine
from dropless.serve.request import Request, SamplingParams

__all__ = ["Engine", "Request", "SamplingParams"]
