"""`dropless serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over the engine.

Endpoints: GET /health, GET /v1/models, GET /v1/models/{id}, POST /v1/completions,
POST /v1/chat/completions, GET /metrics (all but /health and /metrics behind the API key, when
one is set). One engine thread steps the continuous batch; each choice of an HTTP request
(OpenAI's n, for each of a completion's prompts) is an engine Request on its prompt's ids, whose
tokens come back to the event loop through the HTTP request's asyncio queue (their text, and with
logprobs, their log-probabilities, shaped on the event loop). Prompts are rendered and tokenized
in worker threads. A completion's echo puts the prompt's text (with logprobs, the entries the
prefill computed for it) before each choice's first delta. At most `max_queue` engine requests
wait for a slot; past them a request is refused with a 429. Errors have OpenAI's shape:
{"error": {"message", "type", "param", "code"}}.
"""

import asyncio
import dataclasses
import json
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager

from dropless.serve.engine import Engine
from dropless.serve.loop import SWITCH_INTERVAL_S, run_app
from dropless.serve.chat_template import ChatRenderer, PromptTooLong
from dropless.serve.deltas import STREAM_HEADERS, Outbox, deltas, disconnected, texts_of, usage
from dropless.serve.fields import (APIError, chat_messages, check_api_key, check_prompt_size,
                                   choices_count, completion_prompts, echo_flag, ignore_eos,
                                   install_error_handlers, max_body_bytes, max_prompt_chars,
                                   read_body, sampling_params, shown, stop_strings, stream_flags,
                                   template_variables)
from dropless.serve.metrics import Metrics
from dropless.serve.parameters import check_parameters
from dropless.serve.request import Request, SamplingParams, close
from dropless.serve.text import (DEFAULT_CHAT_TEMPLATE, ServedModel, TextStream, chat_logprobs,
                                 completion_logprobs, prompt_entries, prompt_offsets,
                                 token_pieces)


MARK = "\ue000"   # a private-use character: where a streamed chunk's text goes
LOGPROBS_MARK = "\ue001"   # and where its logprobs go
# requests that may wait for a slot, by default, per slot: a queue of a few batches' worth keeps the
# batch full between arrivals, and the last of them is answered within a few batches' replies
QUEUE_PER_SLOT = 8
# a 429's Retry-After, in seconds: the openai client waits this long before its retry (without
# it, 0.5 s, then doubling). A place in the queue frees when a reply ends, which no header can
# foresee; a second is a few hundred decode steps on a GPU
RETRY_AFTER_S = 1


def create_app(served: ServedModel, engine: Engine, max_queue: int | None = None,
               api_key: str | None = None, allowed_origins: tuple[str, ...] = ()):
    """api_key: every endpoint but /health and /metrics asks for it (a bearer token);
    allowed_origins: the web pages' origins whose scripts may call it from a browser (CORS)."""
    from fastapi import Depends, FastAPI, Request as HTTPRequest
    from fastapi.responses import PlainTextResponse, StreamingResponse

    stop_engine = threading.Event()
    max_queue = QUEUE_PER_SLOT * engine.max_batch if max_queue is None else max_queue
    # a longer prompt is refused anyway: the template may render no more
    renderer = ChatRenderer(served.chat_template, served.special_tokens,
                            max_prompt_chars(engine.max_len))
    piece = token_pieces(served.tokenizer)

    @asynccontextmanager
    async def lifespan(app):
        thread = threading.Thread(target=engine.serve_forever, args=(stop_engine,),
                                  name="dropless-engine", daemon=True)
        thread.start()
        yield
        stop_engine.set()   # uvicorn has drained the connections: finish what is left, then stop
        await asyncio.to_thread(thread.join)
        renderer.close()
        # here, not after uvicorn.run: uvicorn re-raises SIGTERM once it has shut down, and the
        # process dies of it before uvicorn.run returns
        print("engine: " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(engine.stats.items())),
              file=sys.stderr, flush=True)

    async def authorized(http_request: HTTPRequest):   # before a body is read
        if api_key is not None and http_request.url.path not in ("/health", "/metrics"):
            check_api_key(http_request.headers.get("authorization"), api_key)

    app = FastAPI(title="dropless", lifespan=lifespan, dependencies=[Depends(authorized)])
    install_error_handlers(app, allowed_origins)
    metrics = Metrics()

    def waiting() -> int:
        """Requests waiting for a slot, under engine.lock, but not those whose client left: the
        engine drops them at its next step, and till then (a long prefill's) they kept later
        clients out with 429s. A scan per arrival (of about max_queue), none in the step."""
        return sum(not r.cancelled for r in engine.waiting)

    def load() -> dict:
        """The engine's load and its counters (steps, prefill forwards and rows, host seconds in
        prefill, CUDA-graph captures), read at once under its lock."""
        with engine.lock:
            return {"running": sum(r is not None for r in engine.slots), "waiting": waiting(),
                    "engine": dict(engine.stats)}

    @app.get("/health")
    async def health():
        """Up, with load(), for monitoring and benchmarks, and how the engine prefills:
        "compiled", or "eager" (not asked for, or its compile failed at warm-up)."""
        return {"status": "ok", **load(), "prefill": "compiled" if engine.compiled else "eager"}

    @app.get("/metrics")   # Prometheus' text format; open as /health is
    async def prometheus():
        return PlainTextResponse(metrics.render(**load()), media_type="text/plain; version=0.0.4")

    card = dict(id=served.name, object="model", created=int(time.time()), owned_by="dropless")

    def known(model) -> None:   # none named: the one served (as other servers do)
        if model is not None and model != served.name:
            raise APIError(404, f"model {shown(model)} does not exist; this server has "
                           f"{served.name!r}", "model", code="model_not_found")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model:path}")   # path: an id may hold a "/" (org/name)
    async def model(model: str):
        known(model)
        return card

    def check_room(n: int = 1) -> None:
        """A 429 when n more engine requests (a request's choices) would make more than
        max_queue wait for a slot: a flood queued without bound, each waiting client holding a
        connection and its prompt for a reply that came ever later. Those that free slots take
        at the next step are not waiting for one."""
        with engine.lock:
            queued = waiting() - engine.slots.count(None)
        if queued + n > max_queue:
            asks = f", no room for this request's {n} choices" if n > 1 else ""
            raise APIError(429, f"the server is busy: {max(queued, 0)} requests already wait for "
                           f"a slot (at most {max_queue}){asks}; retry later",
                           type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_S)})

    async def parse(http_request) -> dict:
        try:   # bounded before it is read: parsing it holds up the event loop
            body = json.loads(await read_body(http_request, max_body_bytes(engine.max_len)))
        except (ValueError, RecursionError) as e:   # nested too deep: was a 500
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        known(body.get("model"))
        check_room()   # before the prompt is rendered and tokenized for nothing
        return body

    post = Outbox().post   # deltas from the engine thread to the event loop

    def start(prompt_ids: list[int], params: SamplingParams, stop: list[str], eos: bool,
              n: int, queue: asyncio.Queue, first: int = 0,
              echo: tuple[str, list[int]] | None = None) -> list[Request]:
        """Submit n choices to the engine, numbered from `first`; returns their engine requests,
        whose deltas (choice, text, entries), each choice's last (choice, None, ()), go to `queue`.
        With params.logprobs set, every token pushed but an EOS (it has no text) has an entry
        (text.Entry). eos False: an EOS does not end a choice (its text is still left out). With
        params.seed, the prompt's choice i samples with seed + i: the choices differ, and the
        request is reproducible, the prompt's the same alone or in a batch (without, each has a
        random seed of its own). echo: (the prompt's text, its tokens' offsets): each choice's first
        delta is that text, with logprobs its entries (after the prefill, which computes them), and
        the generated tokens' offsets follow it."""
        loop = asyncio.get_running_loop()
        logprobs = params.logprobs is not None

        def submit(choice: int) -> Request:   # choice: the reply's index
            text = TextStream(served.tokenizer, stop, served.eos_ids)
            head, base = [echo] if echo else [], len(echo[0]) if echo else 0

            def opening(request):   # the echoed prompt, once, before the first token's delta
                if head:
                    prompt_text, offsets = head.pop()
                    entries = prompt_entries(request.prompt, request.prompt_logprobs,
                                             offsets) if logprobs else ()
                    post(loop, queue, (choice, prompt_text, entries))

            def on_token(request, token):
                if len(request.output) == 1:
                    metrics.first_token(request)
                opening(request)
                offset = base + text.offset
                delta = text.push(token)
                entry = ((token, *request.logprobs[-1], offset),) if (
                    logprobs and token not in text.eos_ids) else ()
                if delta or entry:
                    post(loop, queue, (choice, delta, entry))
                return text.stopped

            def on_finish(request):
                metrics.finished(request)
                opening(request)   # a request of max_tokens 0 has no token
                rest = text.finish()
                if rest:
                    post(loop, queue, (choice, rest, ()))
                post(loop, queue, (choice, None, ()))

            seeded = params if params.seed is None else dataclasses.replace(
                params, seed=params.seed + choice - first)
            request = Request(prompt_ids, seeded, on_token=on_token,
                              eos_ids=served.eos_ids if eos else (), on_finish=on_finish)
            if params.max_tokens == 0 and not logprobs:   # the echo alone: nothing to compute
                close(request, "length")
                return request
            return engine.submit(request)

        return [submit(first + i) for i in range(n)]

    async def encoded(prompt: str | list[int], where: str, chat: bool) -> list[int]:
        if isinstance(prompt, str):
            check_prompt_size(prompt, where, engine.max_len)   # before the tokenizer's work
            try:   # JSON may spell a lone surrogate ("\ud800"): no UTF-8, no tokenizer takes it
                prompt.encode()
            except UnicodeEncodeError as e:
                raise APIError(400, f"{where} is invalid: {e.reason} "
                               f"({e.object[e.start:e.end]!r})", where) from None
            # a model's chat template renders its own BOS: the tokenizer's would double it (as
            # HF's apply_chat_template, encode it without); the default template renders none
            special = not chat or served.chat_template == DEFAULT_CHAT_TEMPLATE
            prompt = (await asyncio.to_thread(served.tokenizer.encode, prompt, special)).tolist()
        if not prompt:
            raise APIError(400, "the prompt is empty", where)
        return prompt

    async def respond(http_request, body: dict, prompts: list[str | list[int]], chat: bool):
        """prompts: a chat's one, or a completion's (each prompt's n choices after the last's)."""
        where, vocab = "messages" if chat else "prompt", served.model.cfg.vocab_size
        ids = [await encoded(prompt, where, chat) for prompt in prompts]
        check_parameters(body, chat)
        echo = echo_flag(body, chat)
        # the context's length before a scan of every token id (a list of ids is not bounded yet)
        params = [sampling_params(body, len(p), engine.max_len, max(
            engine.max_len - len(p) if chat else 16, 1), chat, echo, vocab) for p in ids]
        n = choices_count(body, engine.max_batch)
        if any(not 0 <= t < vocab for p in ids for t in p):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
        stop, (stream, include_usage) = stop_strings(body), stream_flags(body)
        echoes = [None] * len(ids)
        for j, (text, p) in enumerate(zip(prompts, ids) if echo else ()):
            # echoed as sent (a string) or decoded (token ids); a long prompt's: off the loop
            if not isinstance(text, str):
                text = await asyncio.to_thread(served.tokenizer.decode, p)
            echoes[j] = (text, [] if params[j].logprobs is None else await asyncio.to_thread(
                prompt_offsets, served.tokenizer, p))
        total = len(ids) * n
        if total > max_queue + engine.max_batch:   # would wait for room forever
            raise APIError(400, f"{len(ids)} prompts x n={n} = {total} choices: more than this "
                           f"server takes at once ({max_queue + engine.max_batch})", "prompt")
        check_room(total)   # again: others were submitted while these were tokenized
        queue, eos = asyncio.Queue(), not ignore_eos(body)
        requests = [r for j, p in enumerate(ids)
                    for r in start(p, params[j], stop, eos, n, queue, j * n, echoes[j])]
        params = params[0]   # all but max_tokens' default and the context check are the same
        # the client leaving, at any point, cancels its requests (a no-op once they finished):
        # their slots would go on generating for nobody, up to the whole context. Not only the
        # stream's `finally`: Starlette cancels a stream whose client left before its first chunk
        # without ever starting the generator
        left = asyncio.ensure_future(disconnected(http_request))

        def cancel(_) -> None:
            for request in requests:
                request.cancel()

        left.add_done_callback(cancel)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        base = {"id": rid, "created": int(time.time()), "model": served.name}
        kind = "chat.completion" if chat else "text_completion"

        def choice(index: int, text: str | None, finish: str | None, first: bool = False,
                   logprobs: dict | str | None = None) -> dict:
            if not chat:
                return {"index": index, "text": text or "", "logprobs": logprobs,
                        "finish_reason": finish}
            if not stream:
                return {"index": index, "message": {"role": "assistant", "content": text},
                        "logprobs": logprobs, "finish_reason": finish}
            delta = {"role": "assistant", "content": ""} if first else (
                {"content": text} if text else {})
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

        def shaped(entries: list) -> dict | None:
            if params.logprobs is None:
                return None
            return (chat_logprobs if chat else completion_logprobs)(entries, piece)

        def finish_reason(request: Request) -> str:
            if request.finish_reason == "error":
                raise APIError(500, "generation failed", type="server_error")
            return "stop" if request.finish_reason == "stop" else "length"

        if not stream:
            reply = asyncio.ensure_future(texts_of(queue, total))
            try:
                await asyncio.wait((reply, left), return_when=asyncio.FIRST_COMPLETED)
            finally:
                left.cancel()   # and so the requests: a no-op once finished
            replies = await reply   # soon when cancelled: the engine drops them at its next step
            return {**base, "object": kind, "choices": [
                choice(i, text, finish_reason(request), logprobs=shaped(entries))
                for i, (request, (text, entries)) in enumerate(zip(requests, replies))],
                "usage": usage(requests, n)}

        async def events():
            chunk = {**base, "object": kind + ".chunk" if chat else kind}
            if include_usage:   # every chunk carries the field, null until the last one's
                chunk["usage"] = None
            # every delta's event of a choice is the same JSON around its text and logprobs:
            # serialised once a choice, each text spliced in (head, middle, tail; a whole chunk's
            # json.dumps costs ~10x its text's, per token)
            templates = []
            for i in range(total):
                head, tail = json.dumps({**chunk, "choices": [
                    choice(i, MARK, None, logprobs=LOGPROBS_MARK)]}).split(json.dumps(MARK))
                templates.append((head, *tail.split(json.dumps(LOGPROBS_MARK))))
            try:
                if chat:   # each choice's first chunk: its role
                    for i in range(n):
                        role = {**chunk, "choices": [choice(i, "", None, True)]}
                        yield f"data: {json.dumps(role)}\n\n"
                # the choices' chunks interleave as they come, each ended by its finish_reason's
                async for i, text, entries, done in deltas(queue, total):
                    if text or entries:
                        head, middle, tail = templates[i]
                        logprobs = json.dumps(shaped(entries))
                        yield f"data: {head}{json.dumps(text)}{middle}{logprobs}{tail}\n\n"
                    if done:
                        try:
                            last = choice(i, None if chat else "", finish_reason(requests[i]))
                        except APIError as e:   # the engine failed: an error event clients raise
                            yield f"data: {json.dumps(e.body())}\n\n"
                            return
                        yield f"data: {json.dumps({**chunk, 'choices': [last]})}\n\n"
                if include_usage:
                    totals = {**chunk, "choices": [], "usage": usage(requests, n)}
                    yield f"data: {json.dumps(totals)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                left.cancel()   # and so the requests: a no-op once finished
        return StreamingResponse(events(), media_type="text/event-stream", headers=STREAM_HEADERS)

    @app.post("/v1/completions")
    async def completions(http_request: HTTPRequest):
        body = await parse(http_request)
        return await respond(http_request, body, completion_prompts(body), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http_request: HTTPRequest):
        body = await parse(http_request)
        try:   # a template compiles and renders for ms: off the event loop
            prompt = await asyncio.to_thread(renderer.render, chat_messages(
                body, "developer" in served.chat_template), True, template_variables(body))
        except APIError:
            raise
        except PromptTooLong:
            check_prompt_size(None, "messages", engine.max_len)
        except Exception as e:   # the template raised or does not render these messages
            # cut and escaped: a template's message may quote a message's role or content, a
            # megabyte or a lone surrogate (no UTF-8: the error reply itself failed, a 500)
            raise APIError(400, f"the chat template failed on these messages: {shown(str(e))}",
                           "messages") from None
        return await respond(http_request, body, [prompt], chat=True)

    return app


def serve(served: ServedModel, engine: Engine, host: str, port: int, max_queue: int | None = None,
          api_key: str | None = None, allowed_origins: tuple[str, ...] = ()) -> None:
    """Run until SIGINT/SIGTERM; uvicorn then stops accepting, lets the open requests finish
    (streams included) and the lifespan stops the engine thread and prints its counters."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    work = [w for w, on in (("decode graphs", engine.cuda_graphs),
                            ("the compiled prefill", engine.compiled)) if on]
    if work:   # before the first request, not in its way
        start = time.perf_counter()
        print(f"warming up: {' and '.join(work)}", file=sys.stderr, flush=True)
        engine.warm_up(progress=True)
        print(f"warm in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    run_app(create_app(served, engine, max_queue, api_key, allowed_origins), engine.gate, host,
            port)
