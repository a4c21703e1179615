"""Which parameters an OpenAI request may carry: those implemented (fields.py checks their
values), those not implemented but sent with values that ask for nothing, and labels that change
no reply; any other is refused by name."""

import json

from dropless.serve.fields import APIError, shown

# OpenAI parameters not implemented here, with the values that ask for nothing (clients send them):
# any other value is refused, never silently ignored (a reply without the echo or tool call asked
# for, or sampled without the bias, would look like the model's doing). A tool or function
# choice of "auto" asks for nothing when there are no tools (any tool is refused), nor does
# parallel_tool_calls either way; user and metadata (labels for OpenAI's own records) change no
# reply: those are taken as sent, once their types are checked (check_labels). logprobs and
# top_logprobs are implemented, and checked per endpoint (logprobs_count); so is echo, a
# completions field only (echo_flag): a chat is refused it here, as OpenAI's chat has none; and
# logit_bias (logit_bias).
NOT_IMPLEMENTED = {"echo": (False,), "suffix": ("",), "best_of": (1,),
                   "response_format": ({"type": "text"},),
                   "tools": ([],), "tool_choice": ("none", "auto"),
                   "functions": ([],), "function_call": ("none", "auto"),   # tools' old form
                   "modalities": (["text"],), "audio": (), "prediction": (),
                   "web_search_options": (), "reasoning_effort": (),
                   "service_tier": ("auto", "default"), "store": (False,)}


# Every parameter an endpoint takes (besides NOT_IMPLEMENTED's): any other is refused, as OpenAI
# refuses it ("unrecognized request argument"), never ignored: another server's extension (min_p,
# repetition_penalty, ...) sent here would otherwise sample other than the client asked for.
# safety_identifier and prompt_cache_key are labels, as user is (OpenAI: abuse monitoring and
# cache routing); top_k and ignore_eos are extensions other servers take too.
KNOWN = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
         "seed", "stop", "stream", "stream_options", "logprobs", "top_logprobs", "logit_bias",
         "presence_penalty", "frequency_penalty", "user", "metadata", "parallel_tool_calls",
         "ignore_eos", "safety_identifier", "prompt_cache_key", *NOT_IMPLEMENTED}
CHAT_ONLY, COMPLETION_ONLY = {"messages", "chat_template_kwargs"}, {"prompt"}


def check_parameters(body: dict, chat: bool) -> None:
    """Refuses a parameter the endpoint does not know, one of NOT_IMPLEMENTED's that asks for
    something, and a label of the wrong type (check_labels)."""
    known = KNOWN | (CHAT_ONLY if chat else COMPLETION_ONLY)
    for name in body:
        if name not in known:
            raise APIError(400, f"unrecognized request argument supplied: {shown(name)}; this "
                           f"endpoint takes {', '.join(sorted(known))}", name)
    for name, nothing in NOT_IMPLEMENTED.items():
        if name == "echo" and not chat:   # a completions field (echo_flag)
            continue
        value = body.get(name)   # a bool is no number here: echo=0 is no false
        if value is not None and not any(value == v and isinstance(value, bool) == isinstance(
                v, bool) for v in nothing):
            allowed = ", ".join(json.dumps(v) for v in nothing)
            raise APIError(400, f"{name}={shown(value)} is not supported by this server (only "
                           f"{allowed + ' or ' if allowed else ''}null)", name)
    check_labels(body)


# OpenAI's documented bounds on metadata: at most 16 pairs, keys of at most 64 characters, values
# of at most 512, all strings
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512


def check_labels(body: dict) -> None:
    """The fields taken as sent without changing the reply (user, safety_identifier,
    prompt_cache_key, metadata, parallel_tool_calls) still have their types: a client whose
    metadata is malformed is told so, as OpenAI tells it, not served as if it were fine."""
    tools, metadata = body.get("parallel_tool_calls"), body.get("metadata")
    for name in ("user", "safety_identifier", "prompt_cache_key"):
        if not isinstance(body.get(name), (str, type(None))):
            raise APIError(400, f"{name}={shown(body[name])} is invalid: must be a string", name)
    if not isinstance(tools, (bool, type(None))):
        raise APIError(400, f"parallel_tool_calls={shown(tools)} is invalid: must be true or "
                       "false", "parallel_tool_calls")
    if metadata is not None and not (
            isinstance(metadata, dict) and len(metadata) <= METADATA_PAIRS and all(
                isinstance(v, str) and len(k) <= METADATA_KEY_CHARS and
                len(v) <= METADATA_VALUE_CHARS for k, v in metadata.items())):
        raise APIError(400, f"metadata={shown(metadata)} is invalid: an object of at most "
                       f"{METADATA_PAIRS} string values, keys of at most {METADATA_KEY_CHARS} "
                       f"characters, values of at most {METADATA_VALUE_CHARS}", "metadata")
