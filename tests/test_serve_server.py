"""A live `dropless serve` on a tiny random model, driven by the official openai client."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from dropless import DroplessError, ModelConfig, MoEConfig, Transformer  # noqa: E402
from dropless.checkpoint import config_to_dict  # noqa: E402
from dropless.parallel.checkpoint import save  # noqa: E402
from dropless.generate import greedy_recompute  # noqa: E402
from dropless.serve.engine import Engine  # noqa: E402
from dropless.serve.server import create_app  # noqa: E402
from dropless.serve.chat_template import render_chat  # noqa: E402
from dropless.serve.text import DEFAULT_CHAT_TEMPLATE, TextStream, load_served_model  # noqa: E402
from dropless.tokenizer import ByteTokenizer  # noqa: E402
from tests.conftest import subprocess_env  # noqa: E402

CONTEXT = 96


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_seq_len=CONTEXT, moe=MoEConfig(dim=32, hidden_dim=32, num_experts=4,
                                                         top_k=2))
    path = tmp_path_factory.mktemp("serve") / "tiny-run"
    save(path, 0, Transformer(cfg), None, {"model_config": config_to_dict(cfg),
                                           "tokenizer": ByteTokenizer().to_json()})
    return path


class InProcessServer:
    """uvicorn in a thread of this process, on a free port, with an openai client; `app`: more
    arguments of create_app."""

    def __init__(self, model_dir, **app):
        self.served = load_served_model(str(model_dir), torch.device("cpu"))
        self.engine = engine = Engine(self.served.model, max_batch=4, prefill_chunk=16)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.served, engine, **app),
                                                    host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none",
                                    max_retries=0)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(run_dir):
    s = InProcessServer(run_dir)
    yield s.client, s.served, s.port
    s.stop()


def reference(served, prompt: str, n: int) -> str:
    tokens = greedy_recompute(served.model, list(prompt.encode()), n)
    return bytes(tokens).decode("utf-8", errors="replace")


def test_models_and_health(server):
    client, served, port = server
    assert [m.id for m in client.models.list().data] == ["tiny-run"]
    before = health(port)
    assert before["status"] == "ok" and before["running"] == 0 and before["waiting"] == 0
    client.completions.create(model="tiny-run", prompt=[1, 2, 3], max_tokens=2, temperature=0)
    after = health(port)   # one more prefill forward of one row, and at least one step
    assert after["engine"].get("prefills", 0) == before["engine"].get("prefills", 0) + 1
    assert after["engine"].get("prefill_rows", 0) == before["engine"].get("prefill_rows", 0) + 1
    assert after["engine"]["steps"] >= before["engine"].get("steps", 0) + 2
    assert after["prefill"] == "eager"   # this engine does not compile its prefill


def health(port) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as r:
        return json.loads(r.read())


def test_completion_greedy_equals_recompute_and_stream(server):
    client, served, _ = server
    out = client.completions.create(model="tiny-run", prompt="def f(x):", max_tokens=12,
                                    temperature=0)
    assert out.choices[0].text == reference(served, "def f(x):", 12)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (9, 12, 21)
    chunks = list(client.completions.create(model="tiny-run", prompt="def f(x):", max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_default_template_stream_equals_plain(server):
    client, served, _ = server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = "system: Be brief.\nuser: Hi\nassistant:"
    assert render_chat(DEFAULT_CHAT_TEMPLATE, messages, {}) == prompt
    out = client.chat.completions.create(model="tiny-run", messages=messages, max_tokens=10,
                                         temperature=0)
    assert out.choices[0].message.content == reference(served, prompt, 10)
    assert out.choices[0].message.role == "assistant" and out.usage.prompt_tokens == len(prompt)
    chunks = list(client.chat.completions.create(model="tiny-run", messages=messages,
                                                 max_tokens=10, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_and_seed(server):
    client, served, _ = server
    full = reference(served, "class A:", 30)
    stop = full[10:12]
    for stop_arg in (stop, ["\x00never", stop]):
        for stream in (False, True):
            kw = dict(model="tiny-run", prompt="class A:", max_tokens=30, temperature=0, stop=stop_arg)
            if stream:
                text = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
            else:
                out = client.completions.create(**kw)
                text = out.choices[0].text
                assert out.choices[0].finish_reason == "stop"
            assert text == full[:full.index(stop)]
    kw = dict(model="tiny-run", prompt="x", max_tokens=15, temperature=1.0, top_p=0.9)
    a, b = (client.completions.create(seed=11, **kw).choices[0].text for _ in range(2))
    assert a == b


def test_eight_concurrent_requests(server):
    client, served, _ = server
    prompts = [f"item {i} = " * (1 + i % 3) for i in range(8)]

    def ask(p):
        return client.completions.create(model="tiny-run", prompt=p, max_tokens=8 + len(p) % 5,
                                         temperature=0).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert together == [reference(served, p, 8 + len(p) % 5) for p in prompts]


def test_ignore_eos(server):
    """An EOS ends a reply (finish_reason stop, its text left out); with ignore_eos the reply
    goes on to max_tokens (length), EOS tokens counted but still not shown."""
    client, served, _ = server
    tokens = greedy_recompute(served.model, list(b"class A:"), 12)
    eos = tokens[3]
    saved = served.eos_ids
    served.eos_ids = (eos,)
    try:
        kw = dict(model="tiny-run", prompt="class A:", max_tokens=12, temperature=0)
        out = client.completions.create(**kw)
        assert out.choices[0].finish_reason == "stop"
        assert out.usage.completion_tokens == tokens.index(eos) + 1
        for stream in (False, True):
            if stream:
                chunks = list(client.completions.create(stream=True, extra_body={"ignore_eos": True},
                                                        **kw))
                text = "".join(c.choices[0].text for c in chunks)
                assert chunks[-1].choices[0].finish_reason == "length"
            else:
                out = client.completions.create(extra_body={"ignore_eos": True}, **kw)
                text = out.choices[0].text
                assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 12
            assert text == bytes(t for t in tokens if t != eos).decode("utf-8", errors="replace")
    finally:
        served.eos_ids = saved


@pytest.mark.parametrize("kw, status, param", [
    (dict(max_tokens=-1), 400, "max_tokens"),
    (dict(temperature=-0.5), 400, "temperature"),
    (dict(top_p=0), 400, "top_p"),
    (dict(top_p=1.5), 400, "top_p"),
    (dict(max_tokens=CONTEXT), 400, "max_tokens"),
    (dict(stop=7), 400, "stop"),
    (dict(model="gpt-4"), 404, "model"),
    (dict(extra_body={"ignore_eos": "yes"}), 400, "ignore_eos"),
])
def test_errors_have_openai_shape(server, kw, status, param):
    client, _, port = server
    args = {"model": "tiny-run", "prompt": "hello", "max_tokens": 4, **kw}
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(**args)
    assert e.value.status_code == status and e.value.body["param"] == param
    assert set(e.value.body) == {"message", "type", "param", "code"}
    assert client.completions.create(model="tiny-run", prompt="ok", max_tokens=2).usage


@pytest.mark.parametrize("path, data, status", [
    ("/v1/completions", b'{"model": "tiny-run", "prompt": ', 400),
    ("/v1/chat/completions", b'[1, 2]', 400),
    ("/v1/chat/completions", b'{"model": "tiny-run", "messages": "hi"}', 400),
    ("/v1/nothing", b'{}', 404),
    ("/v1/completions", b'{"model": "tiny-run", "prompt": "a", "stream": "false"}', 400),
    ("/v1/chat/completions", b'{"model": "tiny-run", "messages": [{"role": "user", "content": '
                             b'"a"}], "stream": true, "stream_options": "usage"}', 400),
])
def test_bad_bodies(server, path, data, status):
    _, _, port = server
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == status
    assert set(json.loads(e.value.read())["error"]) == {"message", "type", "param", "code"}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as r:
        assert r.status == 200


def test_a_client_that_leaves_mid_body_is_no_server_error(server):
    """A client gone before its whole body came (a timeout mid-upload, a hostile one) was an
    unhandled ClientDisconnect: a 500 and a traceback in the server's log for each."""
    import logging

    client, _, port = server
    errors = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = errors.append
    logging.getLogger("uvicorn.error").addHandler(handler)
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
            time.sleep(0.2)   # the server is reading the body
        time.sleep(0.2)
        assert client.completions.create(model="tiny-run", prompt="ok", max_tokens=2).usage
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
    assert not errors, errors[0].getMessage()


def test_eos_and_chat_template_from_the_model_dir(run_dir, tmp_path):
    import shutil

    model_dir = tmp_path / "with-eos"
    shutil.copytree(run_dir, model_dir)
    served = load_served_model(str(run_dir), torch.device("cpu"))
    ref = greedy_recompute(served.model, list(b"def f(x):"), 12)
    eos = ref[3]
    template = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'tool' %}"
                "{{ raise_exception('no tools here') }}{% endif %}<{{ m.role }}>{{ m.content }}"
                "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, 255]}))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    s = InProcessServer(model_dir)
    try:
        assert s.served.eos_ids == (eos, 255)
        out = s.client.completions.create(model="with-eos", prompt="def f(x):", max_tokens=12,
                                          temperature=0)
        first_eos = ref.index(eos)
        assert out.choices[0].finish_reason == "stop"
        assert out.choices[0].text == bytes(ref[:first_eos]).decode("utf-8", errors="replace")
        assert out.usage.completion_tokens == first_eos + 1   # the EOS counts, adds no text
        chat = s.client.chat.completions.create(model="with-eos", max_tokens=2, messages=[
            {"role": "user", "content": "hi"}])
        assert chat.usage.prompt_tokens == len("<s><user>hi<assistant>")
        with pytest.raises(openai.BadRequestError, match="no tools here"):
            s.client.chat.completions.create(model="with-eos", max_tokens=2, messages=[
                {"role": "tool", "content": "x"}])
        assert s.client.models.list().data[0].id == "with-eos"
    finally:
        s.stop()


def test_a_chat_template_error_quoting_the_messages_is_cut_and_escaped(run_dir, tmp_path):
    """Templates raise with the offending role in the message ("Unexpected message role: " +
    role): a megabyte role came back whole, and a lone surrogate made the error reply a 500."""
    import shutil

    from dropless.serve.fields import SHOWN_CHARS
    model_dir = tmp_path / "strict"
    shutil.copytree(run_dir, model_dir)
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": (
        "{% for m in messages %}{% if m.role != 'user' %}"
        "{{ raise_exception('Unexpected message role: ' + m.role) }}{% endif %}{{ m.content }}"
        "{% endfor %}")}))
    s = InProcessServer(model_dir)
    try:
        for role in ["\ud800", "x" * 500_000]:   # json.dumps escapes the surrogate: \\ud800
            body = {"model": "strict", "messages": [{"role": role, "content": "hi"}]}
            req = urllib.request.Request(f"http://127.0.0.1:{s.port}/v1/chat/completions",
                                         data=json.dumps(body).encode())
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req)
            error = json.loads(e.value.read())["error"]
            assert e.value.code == 400 and error["param"] == "messages", error
            assert "Unexpected message role" in error["message"]
            assert len(error["message"]) < SHOWN_CHARS + 100
    finally:
        s.stop()


def test_a_chat_template_that_would_take_10_gb_is_a_400_and_the_server_serves_on(run_dir, tmp_path):
    """The template renders in a child of bounded memory (in-process, a request took 10 GB)."""
    import shutil

    model_dir = tmp_path / "greedy"
    shutil.copytree(run_dir, model_dir)
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": (
        "{% if messages[0].content == 'go' %}{{ 'x' * 10**10 }}{% endif %}user: hi\n")}))
    s = InProcessServer(model_dir)
    try:
        body = {"model": "greedy", "messages": [{"role": "user", "content": "go"}]}
        req = urllib.request.Request(f"http://127.0.0.1:{s.port}/v1/chat/completions",
                                     data=json.dumps(body).encode())
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        error = json.loads(e.value.read())["error"]
        assert e.value.code == 400 and "MiB of memory" in error["message"], error
        reply = s.client.chat.completions.create(
            model="greedy", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert reply.choices[0].finish_reason == "length"
    finally:
        s.stop()


def test_a_chat_template_bos_is_not_doubled_by_the_tokenizer(tmp_path):
    """A Llama-style tokenizer adds BOS to what it encodes, and the model's chat template renders
    its own "{{ bos_token }}": the chat prompt began with two (HF's apply_chat_template and vLLM
    encode a rendered chat without the tokenizer's special tokens). A completion keeps its BOS."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, processors

    tok = HFTokenizer.from_str(ByteTokenizer().to_hf_json())
    tok.add_special_tokens([AddedToken("<s>", special=True)])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    cfg = ModelConfig(vocab_size=264, dim=32, num_layers=1, num_heads=4, num_kv_heads=2,
                      max_seq_len=CONTEXT, moe=MoEConfig(dim=32, hidden_dim=32, num_experts=4,
                                                         top_k=2))
    model_dir = tmp_path / "bos-run"
    save(model_dir, 0, Transformer(cfg), None, {"model_config": config_to_dict(cfg),
                                                "tokenizer": tok.to_str()})
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}"
                          "{% endfor %}<assistant>", "bos_token": "<s>"}))
    s = InProcessServer(model_dir)
    prompts, submit = [], s.engine.submit
    s.engine.submit = lambda request: submit(prompts.append(request.prompt) or request)
    try:
        s.client.chat.completions.create(model="bos-run", max_tokens=1, messages=[
            {"role": "user", "content": "hi"}])
        s.client.completions.create(model="bos-run", prompt="hi", max_tokens=1)
    finally:
        s.stop()
    assert prompts == [[bos, *b"<user>hi<assistant>"], [bos, *b"hi"]]


def test_chat_templates_may_use_loop_controls():
    """Hugging Face renders chat templates with jinja2's loopcontrols; Qwen3.5's breaks out of its
    reversed scan for the last user query. Without them the template did not compile: every chat
    request to such a model was a 400."""
    template = ("{% for m in messages[::-1] %}{% if m.role == 'user' %}{{ m.content }}{% break %}"
                "{% endif %}{% endfor %}|{% for m in messages %}{% if m.role == 'system' %}"
                "{% continue %}{% endif %}{{ m.role }};{% endfor %}")
    messages = [{"role": r, "content": c} for r, c in
                [("system", "s"), ("user", "u1"), ("assistant", "a"), ("user", "u2")]]
    assert render_chat(template, messages, {}) == "u2|user;assistant;user;"


def test_text_stream_holds_back_stop_prefixes():
    stream = TextStream(ByteTokenizer(), ["abc"])
    pieces = [stream.push(t) for t in b"xxab"]
    assert "".join(pieces) == "xx" and not stream.stopped
    assert stream.push(ord("d")) == "abd"
    assert stream.push(ord("a")) == "" and stream.push(ord("b")) == ""
    assert stream.push(ord("c")) == "" and stream.stopped and stream.finish() == ""
    multi = TextStream(ByteTokenizer(), [], eos_ids=(0,))
    assert multi.push(0xC3) == "" and multi.push(0xA9) == "é" and multi.push(0) == ""


def test_text_stream_is_the_text_cut_at_the_first_stop_to_complete():
    """Random texts and stop strings: the streamed deltas concatenate to the shortest prefix of
    the text that holds a stop string, cut where the first stop string in it starts (the whole
    text if none); the stream keeps only the tail a stop string can still reach."""
    import random

    rng = random.Random(0)
    for _ in range(400):
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 40)))
        stop = ["".join(rng.choice("ab c") for _ in range(rng.randint(1, 4)))
                for _ in range(rng.randint(0, 3))]
        stream, out = TextStream(ByteTokenizer(), stop), ""
        for byte in text.encode():
            out += stream.push(byte)
            assert len(stream.text) <= len(text) - len(out) + max(map(len, stop), default=0)
            if stream.stopped:
                break
        out += stream.finish()
        expected = text
        for end in range(len(text) + 1):
            found = [i for i in (text[:end].find(s) for s in stop) if i >= 0]
            if found:
                expected = text[:min(found)]
                break
        assert out == expected, (text, stop)


class CliServer:
    """`dropless serve` in a subprocess, with an openai client once it answers."""

    def __init__(self, run_dir, *flags):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "dropless", "serve", str(run_dir),
                                      "--port", str(self.port), *flags], env=self.env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="x",
                                    max_retries=0)
        for _ in range(3000):   # up to 5 min: on CUDA the prefill compiles first
            try:
                self.client.models.list()
                return
            except openai.APIConnectionError:
                assert self.proc.poll() is None, self.proc.stdout.read().decode()[-3000:]
                time.sleep(0.1)

    @staticmethod
    def env() -> dict:
        """subprocess_env, keeping our PYTHONPATH too (packages installed with pip --target)."""
        env = subprocess_env()
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] += os.pathsep + os.environ["PYTHONPATH"]
        return env

    def stop_and_check(self):
        """SIGTERM while a stream runs: the stream still completes, then the process exits."""
        stream = self.client.completions.create(model="tiny-run", prompt="a", max_tokens=60,
                                                temperature=0, stream=True)
        first = next(iter(stream))
        os.kill(self.proc.pid, signal.SIGTERM)
        rest = list(stream)
        assert [c.choices[0].finish_reason for c in [first, *rest]][-1] == "length"
        # uvicorn re-raises the signal once drained: the exit status says "terminated by SIGTERM"
        assert self.proc.wait(timeout=60) in (0, -signal.SIGTERM)
        out = self.proc.stdout.read()
        assert b"Finished server process" in out
        assert re.search(rb"\nengine: .*prefills [1-9].*steps [1-9]", out), out[-2000:]   # counters

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()


def test_cli_serve_and_sigterm_drains(run_dir):
    """With --api-key (the key the clients send): a client without it is refused."""
    server = CliServer(run_dir, "--device", "cpu", "--max-batch", "2", "--api-key", "x")
    try:
        stranger = openai.OpenAI(base_url=server.client.base_url, api_key="y", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()
        server.stop_and_check()
    finally:
        server.kill()


@pytest.mark.gpu
def test_gpu_serve_smoke(run_dir):
    """The product path on CUDA: bf16 weights, CUDA-graph decode steps for buckets 1..8, with and
    without log-probabilities and penalties; n choices and echo; an API key, a batch of prompts
    with a logit_bias, /metrics."""
    server = CliServer(run_dir, "--device", "cuda", "--max-batch", "8", "--api-key", "x")
    client = server.client
    try:
        kw = dict(model="tiny-run", prompt="def main():", max_tokens=20, temperature=0)
        plain = client.completions.create(**kw)
        streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
        assert plain.choices[0].text == streamed and plain.usage.completion_tokens == 20
        chat = client.chat.completions.create(model="tiny-run", max_tokens=8,
                                              messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 8
        # log-probabilities: the decode step's graph of its own, captured while serving
        kw = dict(model="tiny-run", max_tokens=8, temperature=0, logprobs=True, top_logprobs=3,
                  messages=[{"role": "user", "content": "hi"}])
        lp = client.chat.completions.create(**kw).choices[0].logprobs.content
        streamed = [e for c in client.chat.completions.create(stream=True, **kw)
                    if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        assert len(lp) == 8 and [e.model_dump() for e in streamed] == [e.model_dump() for e in lp]
        assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == e.logprob <= 0
                   for e in lp)   # greedy: the most likely

        # n choices, penalties (their graphs of their own), echo with max_tokens 0
        many = client.completions.create(model="tiny-run", prompt="x", max_tokens=10, n=3,
                                         temperature=0, frequency_penalty=1.5)
        assert [c.index for c in many.choices] == [0, 1, 2] and many.usage.completion_tokens == 30
        assert len({c.text for c in many.choices}) == 1   # greedy: every choice the same
        scored = client.completions.create(model="tiny-run", prompt="def main():", echo=True,
                                           logprobs=2, max_tokens=0, temperature=0)
        entries = scored.choices[0].logprobs
        assert scored.choices[0].text == "def main():" and scored.usage.completion_tokens == 0
        assert entries.token_logprobs[0] is None and len(entries.token_logprobs) > 1
        assert all(v <= 0 and len(top) <= 2 for v, top in zip(entries.token_logprobs[1:],
                                                               entries.top_logprobs[1:]))

        # a batch of prompts, a logit_bias (the adjusted logits' graph): the biased token forced
        batch = client.completions.create(model="tiny-run", prompt=["a", "bb", "ccc"], max_tokens=6,
                                          temperature=0, logit_bias={"65": 100})
        assert [c.text for c in batch.choices] == ["AAAAAA"] * 3
        assert batch.usage.prompt_tokens == 6
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics") as r:
            scraped = r.read().decode()
        assert re.search(r'^dropless_request_success_total\{finished_reason="length"\} [1-9]',
                         scraped, re.MULTILINE), scraped[:2000]

        def ask(i):
            return client.completions.create(model="tiny-run", prompt=f"x = {i}", max_tokens=12 + i,
                                             temperature=0.7, seed=i)

        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(ask, range(8)))
        assert [o.usage.completion_tokens for o in outs] == [12 + i for i in range(8)]
        assert all(o.choices[0].finish_reason == "length" for o in outs)
        server.stop_and_check()
    finally:
        server.kill()


def test_cli_serve_without_fastapi(monkeypatch, capsys, run_dir):
    import importlib.util

    from dropless import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert cli.main(["serve", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'dropless[serve]'" in err


def test_serve_shortens_the_gil_switch_interval_and_captures_first(monkeypatch, capsys):
    """The engine thread must get the GIL back within a fraction of a decode step while the event
    loop writes streams (Python's default lets it wait 5 ms); every decode graph is captured
    before the server listens. (The counters printed at stop: test_cli_serve_and_sigterm_drains,
    in a real process, where uvicorn.run does not return after SIGTERM.)"""
    from dropless.serve import server as server_module

    class FakeEngine:
        captured, compiled, cuda_graphs, gate = False, True, False, "the engine's gate"

        def warm_up(self, progress=False):
            self.captured = progress

    engine, seen = FakeEngine(), {}
    monkeypatch.setattr(server_module, "create_app",
                        lambda served, engine, max_queue, api_key, *rest: None)
    monkeypatch.setattr(server_module, "run_app", lambda app, gate, host, port: seen.update(
        interval=sys.getswitchinterval(), captured=engine.captured, gate=gate, port=port))
    before = sys.getswitchinterval()
    try:
        server_module.serve(None, engine, "127.0.0.1", 0)
    finally:
        sys.setswitchinterval(before)
    assert seen["interval"] == pytest.approx(server_module.SWITCH_INTERVAL_S)
    assert seen["interval"] < 1e-3 and seen["port"] == 0 and seen["captured"]
    assert seen["gate"] == "the engine's gate"   # the event loop waits out the prefills
    err = capsys.readouterr().err
    assert "warming up: the compiled prefill\n" in err


@pytest.mark.parametrize("name,content,message", [
    ("generation_config.json", [], "must hold a JSON object, not list"),
    ("tokenizer_config.json", [1], "must hold a JSON object, not list"),
    ("tokenizer_config.json", {"eos_token": 5}, "eos_token: must be a string"),
    ("tokenizer_config.json", {"chat_template": [{"name": "x"}]}, "chat_template must be"),
    ("tokenizer_config.json", {"chat_template": 3}, "chat_template must be"),
    ("generation_config.json", {"eos_token_id": "x"}, "eos_token_id='x' is invalid"),
    ("generation_config.json", {"eos_token_id": 1.5}, "eos_token_id=1.5 is invalid"),
    ("generation_config.json", {"eos_token_id": [3, 100000]}, "is invalid: an id or a list"),
    ("generation_config.json", {"eos_token_id": True}, "eos_token_id=True is invalid"),
    ("config.json", "a directory", "config.json: not a regular file"),
])
def test_bad_generation_and_tokenizer_configs_are_one_line(run_dir, tmp_path, name, content, message):
    # these files come from strangers: an AttributeError / KeyError / TypeError traceback, or EOS
    # ids that never stop a request (accepted silently), used to follow
    import shutil

    model_dir = tmp_path / "bad"
    shutil.copytree(run_dir, model_dir)
    if content == "a directory":
        (model_dir / name).mkdir()
    else:
        (model_dir / name).write_text(json.dumps(content))
    with pytest.raises(DroplessError, match=re.escape(message)) as e:
        load_served_model(str(model_dir), torch.device("cpu"))
    assert str(e.value).count(str(model_dir / name)) == 1, e.value   # named, and only once
