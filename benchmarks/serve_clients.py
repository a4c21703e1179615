"""The streaming clients of the serving benchmarks (decode.py, serve_host.py): a benchmark's
server in a subprocess, and rounds of concurrent streaming clients of its /v1/completions."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time


async def _client(http, url, prompt, new):
    start, stamps, usage = time.perf_counter(), [], None
    body = {"model": "bench", "prompt": prompt, "max_tokens": new, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    async with http.stream("POST", url, json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
            usage = chunk.get("usage") or usage
    return start, stamps, usage["completion_tokens"]


def httpx_module():
    try:
        import httpx
    except ImportError:   # newer openai clients ship the same API as httpx2
        import httpx2 as httpx
    return httpx


async def stream_round(port, prompts, new):
    httpx = httpx_module()
    url = f"http://127.0.0.1:{port}/v1/completions"
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=256)) as http:
        results = await asyncio.gather(*[_client(http, url, p, new) for p in prompts])
    begin = min(r[0] for r in results)
    end = max(r[1][-1] for r in results)
    tokens = sum(r[2] for r in results)
    ttft = [r[1][0] - r[0] for r in results]
    itl = [(r[1][-1] - r[1][0]) / max(r[2] - 1, 1) for r in results]
    return {"tokens_per_s": tokens / (end - begin), "ttft_ms": statistics.median(ttft) * 1e3,
            "itl_ms": statistics.median(itl) * 1e3, "completion_tokens": tokens}


def health(httpx, port) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()


def engine_counters(httpx, port) -> dict:
    return health(httpx, port)["engine"]


def start_server(script: str, flags: list[str]) -> tuple[subprocess.Popen, int]:
    """`python script --serve-port PORT *flags` in a subprocess (the repository on its path),
    once its /health answers: (process, port). Its stderr goes to a temp file (a pipe nobody
    reads would block a server that writes 64 KiB of warnings); `stop_server` returns its tail."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get(
        "PYTHONPATH")]))}
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, script, "--serve-port", str(port), *flags], env=env,
                            stdout=subprocess.DEVNULL, stderr=log)
    proc.log = log
    httpx = httpx_module()
    for _ in range(600):
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc, port
        except httpx.TransportError:
            if proc.poll() is not None:
                raise RuntimeError(stop_server(proc)[-2000:])
            time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError(f"{script}: the server did not answer in 2 minutes")


def stop_server(proc: subprocess.Popen, lines: int = 40) -> str:
    """Stop a `start_server` process (SIGTERM: it drains and prints the engine's counters); the
    last `lines` lines of its stderr."""
    proc.terminate()
    proc.wait(timeout=60)
    proc.log.seek(0)
    text = proc.log.read().decode(errors="replace")
    proc.log.close()
    return "\n".join(text.splitlines()[-lines:])
