"""The OpenAI request's fields, checked: every mistake is an APIError (OpenAI's error shape, with
the field's name), raised before any work is done on the request; and the bounds on its size,
checked before its body is parsed or its prompt tokenized. The event loop parses every request:
a multi-megabyte prompt tokenized there stalled every other client.
"""

import hmac

from dropless.serve.request import (LOGIT_BIAS_BOUND, MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS,
                                    SamplingParams)

# A prompt of more characters than this per token of the context is refused untokenized: a token
# is about 4 characters of English text, and no usual tokenizer's are 32 on average.
CHARS_PER_TOKEN = 32


def max_prompt_chars(max_len: int) -> int:
    return CHARS_PER_TOKEN * max_len


def max_body_bytes(max_len: int) -> int:
    """JSON spells a character in at most 12 bytes (an escaped surrogate pair); 1 MiB for the rest
    of the body (other messages, stop strings)."""
    return 12 * max_prompt_chars(max_len) + (1 << 20)


# An error names the bad value cut to this many characters: a rejected body of a megabyte echoed
# whole made each bad request cost the server a megabyte of reply
SHOWN_CHARS = 200


def shown(value) -> str:
    """repr(value) for an error message, cut to SHOWN_CHARS characters."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} characters)"


class APIError(Exception):
    """`headers`: the reply's HTTP headers besides its JSON body (a 429's Retry-After)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _number(body: dict, name: str, kind, default, ok, allowed: str):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kind) or not ok(value):
        raise APIError(400, f"{name}={shown(value)} is invalid: {allowed}", name)
    return value


def sampling_params(body: dict, num_prompt: int, max_len: int, default_max: int,
                    chat: bool, echo: bool = False, vocab: int | None = None) -> SamplingParams:
    """echo: max_tokens may be 0 (the prompt scored only), and logprobs covers the prompt too;
    vocab: the model's, which logit_bias's token ids must be in (None: not checked here)."""
    # either name (max_tokens null or absent: max_completion_tokens), and errors say which
    name = ("max_completion_tokens" if body.get("max_tokens") is None
            and body.get("max_completion_tokens") is not None else "max_tokens")
    least = 0 if echo else 1
    max_tokens = _number(body, name, int, default_max, lambda v: v >= least,
                         f"must be an integer >= {least}" + ("" if chat or echo else
                                                            " (0 only with echo)"))
    if num_prompt + max_tokens > max_len:
        raise APIError(400, f"prompt ({num_prompt} tokens) + {name} ({max_tokens}) = "
                       f"{num_prompt + max_tokens} exceeds the model's context of {max_len} tokens",
                       name, code="context_length_exceeded")
    top_k = _number(body, "top_k", int, None, lambda v: v >= -1, "must be >= 1 (0 or -1: off)")
    logprobs = logprobs_count(body, chat)
    # max_tokens 0 is valid with prompt_logprobs only; without logprobs the server replies with
    # the echo alone, never submitting the request (server.start)
    prompt_logprobs = (0 if max_tokens == 0 and logprobs is None else logprobs) if echo else None
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 1e4,
                                  "must be in [0, 10000]")),
        top_p=float(_number(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1,
                            "must be in (0, 1]")),
        top_k=None if top_k in (None, 0, -1) else top_k,
        seed=_number(body, "seed", int, None, lambda v: True, "must be an integer"),
        logprobs=logprobs, prompt_logprobs=prompt_logprobs, logit_bias=logit_bias(body, vocab),
        **{name: float(_number(body, name, (int, float), 0.0, lambda v: -2 <= v <= 2,
                               "must be in [-2, 2]"))
           for name in ("presence_penalty", "frequency_penalty")})


# OpenAI's bound on n, the choices a request asks for
MAX_CHOICES = 128


def choices_count(body: dict, max_batch: int) -> int:
    """n: each choice is an engine request of its own, taking a slot, so no more than the
    engine's slots (one request's choices decode side by side), nor, whatever the batch,
    MAX_CHOICES."""
    bound = min(max_batch, MAX_CHOICES)
    return _number(body, "n", int, 1, lambda v: 1 <= v <= bound,
                   f"must be an integer in [1, {bound}] (a choice takes one of the engine's "
                   f"{max_batch} slots; OpenAI's bound is {MAX_CHOICES})")


def completion_prompts(body: dict) -> list[str | list[int]]:
    """A completion's prompts, in OpenAI's four forms: a string, a list of strings, a list of
    token ids, a list of lists of token ids; at most MAX_CHOICES of them (each its n choices)."""
    prompt = body.get("prompt")

    def ids(p) -> bool:
        return isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                           for t in p)
    if isinstance(prompt, str) or ids(prompt):   # [] too: "the prompt is empty"
        return [prompt]
    if isinstance(prompt, list) and (all(isinstance(p, str) for p in prompt)
                                     or all(ids(p) for p in prompt)):
        if len(prompt) > MAX_CHOICES:
            raise APIError(400, f"prompt is a list of {len(prompt)} prompts: at most "
                           f"{MAX_CHOICES}", "prompt")
        return prompt
    raise APIError(400, "prompt is invalid: a string, a list of strings, a list of token ids or "
                   "a list of lists of token ids", "prompt")


def logprobs_count(body: dict, chat: bool) -> int | None:
    """SamplingParams.logprobs: None for no log-probabilities, else how many of the most likely
    tokens each output token's lists. A chat asks with logprobs (a boolean) and top_logprobs (an
    int, only with logprobs true, as OpenAI); a completion with logprobs=n (an int; OpenAI's bound
    is 5, this server's the chat's 20), and has no top_logprobs: anything but 0 there is refused."""
    bound = f"must be an integer in [0, {MAX_TOP_LOGPROBS}]"
    top = body.get("top_logprobs")
    if not chat:
        if top is not None and (top != 0 or isinstance(top, bool)):
            raise APIError(400, f"top_logprobs={shown(top)} is not a completions parameter: "
                           "logprobs=n asks for each token's n most likely", "top_logprobs")
        return _number(body, "logprobs", int, None, lambda v: 0 <= v <= MAX_TOP_LOGPROBS, bound)
    asked = body.get("logprobs")
    if not isinstance(asked, (bool, type(None))):
        raise APIError(400, f"logprobs={shown(asked)} is invalid: must be true or false",
                       "logprobs")
    n = _number(body, "top_logprobs", int, None, lambda v: 0 <= v <= MAX_TOP_LOGPROBS, bound)
    if n and not asked:   # 0 asks for nothing: clients send it with logprobs false
        raise APIError(400, f"top_logprobs={n} is only allowed when logprobs is true",
                       "top_logprobs")
    return (n or 0) if asked else None


def logit_bias(body: dict, vocab: int | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias: an object of token ids (as strings, JSON's keys) to biases."""
    value = body.get("logit_bias")
    if value is None:
        return ()
    allowed = (f"must be an object of at most {MAX_LOGIT_BIAS} token ids (strings of digits"
               f"{f' below {vocab}' if vocab else ''}) to numbers in [-{LOGIT_BIAS_BOUND}, "
               f"{LOGIT_BIAS_BOUND}]")
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise APIError(400, f"logit_bias={shown(value)} is invalid: {allowed}", "logit_bias")
    pairs = []
    for key, bias in value.items():
        token = (int(key) if isinstance(key, str) and key.isascii() and key.isdigit()
                 and len(key) <= 12 else None)
        if (token is None or vocab is not None and token >= vocab or isinstance(bias, bool)
                or not isinstance(bias, (int, float))
                or not -LOGIT_BIAS_BOUND <= bias <= LOGIT_BIAS_BOUND):
            raise APIError(400, f"logit_bias entry {shown(key)}: {shown(bias)} is invalid: "
                           f"{allowed}", "logit_bias")
        pairs.append((token, float(bias)))
    if len({t for t, _ in pairs}) < len(pairs):   # "7" and "007"
        raise APIError(400, "logit_bias names a token twice (as different strings)", "logit_bias")
    return tuple(pairs)


def echo_flag(body: dict, chat: bool) -> bool:
    """A completion's echo: a boolean, not anything truthy (a chat's: check_implemented)."""
    value = body.get("echo")
    if chat or value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"echo={shown(value)} is invalid: must be true or false", "echo")
    return value


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and len(stop) <= 16 and all(isinstance(s, str) for s in stop):
        return stop
    raise APIError(400, f"stop={shown(stop)} is invalid: a string or a list of up to 16 strings",
                   "stop")


def ignore_eos(body: dict) -> bool:
    """The extension `ignore_eos` (benchmark clients send it for replies of exactly max_tokens): a
    boolean, not anything truthy."""
    value = body.get("ignore_eos")
    if not isinstance(value, (bool, type(None))):
        raise APIError(400, f"ignore_eos={shown(value)} is invalid: must be true or false",
                       "ignore_eos")
    return bool(value)


def stream_flags(body: dict) -> tuple[bool, bool]:
    """(stream, stream_options.include_usage): booleans, not anything truthy ("false" is truthy)."""
    stream, options = body.get("stream"), body.get("stream_options")
    if not isinstance(stream, (bool, type(None))):
        raise APIError(400, f"stream={shown(stream)} is invalid: must be true or false", "stream")
    if options is not None and not (isinstance(options, dict) and isinstance(
            options.get("include_usage"), (bool, type(None)))):
        raise APIError(400, f"stream_options={shown(options)} is invalid: an object with an "
                       "optional boolean include_usage", "stream_options")
    if options is not None and not stream:   # as OpenAI: options for a stream that is not one
        raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
    return bool(stream), bool(options and options.get("include_usage"))


def chat_messages(body: dict, developer: bool = False) -> list[dict]:
    """The messages, each content a string: content parts' texts joined by newlines (separate
    blocks, not one run of words). OpenAI's "developer" role (instructions, system's successor)
    is "system" unless the template knows `developer` (templates know system, and some refuse
    or drop a role they do not know)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages is invalid: a non-empty list of {role, content}", "messages")
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        # content parts: text only (an image dropped silently would go unanswered unnoticed)
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise APIError(400, f"messages item {shown(m)} is invalid: content parts must be "
                               '{"type": "text", "text": string}; this server takes text only',
                               "messages")
            content = "\n".join(p["text"] for p in content)
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise APIError(400, f"messages item {shown(m)} is invalid: needs a string role and "
                           "content", "messages")
        role = "system" if m["role"] == "developer" and not developer else m["role"]
        out.append({**m, "role": role, "content": content})
    return out


def template_variables(body: dict) -> dict:
    """chat_template_kwargs: more variables for the chat template (e.g. Qwen3's enable_thinking),
    as Hugging Face's apply_chat_template takes them; names the template gets anyway (messages,
    add_generation_prompt, special tokens) keep their values."""
    value = body.get("chat_template_kwargs")
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(k.isidentifier() for k in value):
        raise APIError(400, f"chat_template_kwargs={shown(value)} is invalid: an object of "
                       "template variables (names that are identifiers) to JSON values",
                       "chat_template_kwargs")
    return value


def check_prompt_size(prompt: str | None, where: str, max_len: int) -> None:
    """None: a prompt known to be longer than the bound (a chat template's, cut off there)."""
    limit = max_prompt_chars(max_len)
    if prompt is None or len(prompt) > limit:
        size = f"more than {limit}" if prompt is None else len(prompt)
        raise APIError(400, f"{where} is too long: {size} characters, and this server takes "
                       f"at most {limit} ({CHARS_PER_TOKEN} a token of its {max_len}-token "
                       "context)", where, code="context_length_exceeded")


def install_error_handlers(app, allowed_origins: tuple[str, ...] = ()) -> None:
    """Every error in OpenAI's shape: an APIError as raised, Starlette's own (404, 405) and any
    other exception (a 500 naming it). With `allowed_origins` ("*": any), scripts of those web
    pages may call the API from a browser: CORS headers on every reply (errors too, or the
    browser hides them from the page), preflights answered before the API key is asked for."""
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins),
                           allow_methods=["GET", "POST"], allow_headers=["*"])

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), type=kind).body(),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}",
                                     type="server_error").body(), status_code=500)


def check_api_key(authorization: str | None, key: str) -> None:
    """A 401 unless the Authorization header is "Bearer <key>" (compared in constant time)."""
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise APIError(401, "missing or incorrect API key: send the header 'Authorization: "
                       "Bearer <key>' with the key the server was started with",
                       code="invalid_api_key")


async def read_body(http_request, limit: int) -> bytes:
    """The request's body, refused with a 413 past `limit` bytes before the rest is read: at once
    when its Content-Length says so, else (chunked) as it comes."""
    from starlette.requests import ClientDisconnect

    def too_large(size: str):
        return APIError(413, f"the request body ({size} bytes) is too large: this server takes at "
                        f"most {limit} bytes", code="request_too_large")

    size = http_request.headers.get("content-length", "")
    if size.isdigit() and int(size) > limit:
        raise too_large(size)
    chunks, size = [], 0
    try:
        async for chunk in http_request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise too_large(f"more than {limit}")
    except ClientDisconnect:   # not a server error: unhandled, it was a 500 and a logged traceback
        raise APIError(400, "the client left before sending the whole body") from None
    return b"".join(chunks)
