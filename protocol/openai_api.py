"""OpenAI-compatible request parsing and error bodies, shared by replica and balancer.

Torch-free. Every problem with what a client sent becomes an `APIError` with a 4xx status and
a message that says what to change; handlers turn it into the OpenAI error shape
`{"error": {"message", "type", "param", "code"}}` (type and code as vLLM's server sets them:
the error class name and the HTTP status).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
          405: "MethodNotAllowed", 408: "RequestTimeout", 413: "PayloadTooLarge", 429: "RateLimitError",
          500: "InternalServerError", 502: "BadGateway", 503: "ServiceUnavailable", 504: "GatewayTimeout"}


# The error `code` of a request that a replica's whole KV cache cannot hold (a string code, as
# OpenAI's `context_length_exceeded`): a balancer serves it on another replica instead of relaying it.
KV_CAPACITY_EXCEEDED = "kv_cache_capacity_exceeded"


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape; `code` is the status unless a string code says more."""
    return {"error": {"message": message, "type": _TYPES.get(status, "Error"), "param": param,
                      "code": status if code is None else code}}


def error_code(raw: bytes) -> object:
    """The `error.code` of an OpenAI-style error body (None when it is not one)."""
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    err = body.get("error") if isinstance(body, dict) else None
    return err.get("code") if isinstance(err, dict) else None


# A JSON escape of a UTF-16 surrogate. Pairs decode to one character; a lone one decodes to a str
# that cannot be encoded as UTF-8 (a tokenizer or hash would raise on it), so it is refused here.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def decode_json_body(raw: bytes) -> Any:
    """A request body as JSON, or an `APIError(400)` saying what is wrong with it.

    Refuses, with a 400 rather than an exception from deep inside a handler: invalid UTF-8,
    invalid JSON, nesting deeper than the decoder's recursion limit, integers longer than
    Python's int-conversion limit (4,300 digits), and strings holding a lone UTF-16 surrogate
    (`"\\ud800"`). NaN and Infinity literals decode (as Python's json does); the field validators
    below refuse them where a number matters.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not valid UTF-8") from None
    try:
        body = json.loads(text)
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and the int digit limit (a plain ValueError)
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if _SURROGATE_ESCAPE.search(raw) is not None and _has_lone_surrogate(body):
        raise APIError(400, "the request body holds a lone UTF-16 surrogate escape (e.g. \\ud800), "
                            "which is not a character; send valid Unicode")
    return body


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]  # iterative: the decoder allows nesting deeper than a recursive walk would
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


@dataclass(frozen=True)
class GenerationRequest:
    """A validated completions or chat-completions body."""

    kind: str  # "completion" | "chat"
    model: str | None
    prompt: str | None = None  # text prompt (completions)
    prompt_token_ids: tuple[int, ...] | None = None  # token prompt (completions)
    messages: tuple[dict[str, Any], ...] | None = None  # chat
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    stream: bool = False
    include_usage: bool = False
    cache_salt: str | None = None
    user: str | None = None
    return_token_ids: bool = False  # vLLM's extension: token ids in every choice
    extra: dict[str, Any] = field(default_factory=dict)
    n: int = 1  # sequences decoded per prompt (the balancer's parse: max(n, best_of))
    more_prompts: tuple[str | tuple[int, ...], ...] = ()  # a batched prompt's prompts after the first
    logprobs: int | None = None  # top logprobs per output token (0: the sampled token's); None: none
    echo: bool = False  # completions: the prompt precedes the completion in the text
    # The balancer's parse alone (`parse_for_routing`): a lost stream can be continued exactly.
    continuable: bool = False
    # vLLM's disaggregated-serving field (NixlConnector's shape): {"do_remote_decode": true} asks a
    # prefill replica to keep the prompt's KV for a decode replica; {"do_remote_prefill": true,
    # "remote_host", "remote_port", "remote_request_id", "remote_block_ids", ...} tells a decode
    # replica where to pull it from (replica/kv_transfer.py). None: an ordinary request.
    kv_transfer_params: dict[str, Any] | None = None


_INT_LIMIT = 2**31 - 1
MAX_N = 128  # sequences per prompt (n)
MAX_LOGPROBS = 20  # top logprobs per token: vLLM's default max_logprobs
MAX_BATCH = 256  # prompts in one batched completions request


def _get_bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(400, f"'{name}' must be a boolean, got {type(v).__name__}", name)
    return v


def _get_int(body: dict, name: str, default: int | None, lo: int | None = None, hi: int = _INT_LIMIT) -> int | None:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise APIError(400, f"'{name}' must be an integer, got {type(v).__name__}", name)
    if lo is not None and v < lo:
        raise APIError(400, f"'{name}' must be at least {lo}, got {v}", name)
    if v > hi:
        raise APIError(400, f"'{name}' must be at most {hi}, got {v}", name)
    return v


def _get_float(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise APIError(400, f"'{name}' must be a number, got {type(v).__name__}", name)
    v = float(v)
    if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise APIError(400, f"'{name}' must be in {bound}, got {v}", name)
    return v


def _get_stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise APIError(400, "'stop' must be a string or a list of strings", "stop")
    if len(v) > 16:
        raise APIError(400, "'stop' takes at most 16 strings", "stop")
    if any(s == "" for s in v):
        raise APIError(400, "'stop' strings must not be empty", "stop")
    return tuple(v)


# What a kvfleet replica cannot honour, with the values that mean "not asked for": refused
# (400) rather than silently ignored. A balancer forwards them (vLLM and SGLang serve them).
_UNSUPPORTED = (("presence_penalty", (None, 0)), ("frequency_penalty", (None, 0)), ("repetition_penalty", (None, 1)),
                ("logit_bias", (None, {})), ("tools", (None, [])), ("guided_json", (None,)), ("guided_regex", (None,)),
                ("guided_choice", (None,)), ("guided_grammar", (None,)), ("structured_outputs", (None,)))


def _common(body: Any, kind: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "'model' must be a string", "model")
    n = _get_int(body, "n", 1, lo=1, hi=MAX_N)
    best_of = _get_int(body, "best_of", None, lo=1, hi=MAX_N)
    if best_of is not None and best_of != n:  # as vLLM's V1 engine, which dropped best_of
        raise APIError(400, f"best_of other than n is not supported (got best_of={best_of}, n={n}); "
                            f"send n samples and pick among them", "best_of")
    logprobs = _get_logprobs(body, kind)
    for name, neutral in _UNSUPPORTED:
        if body.get(name) not in neutral:
            raise APIError(400, f"'{name}' is not supported by this server (the tiny engine has no logit "
                                f"processors, guided decoding or tool parser); leave it out", name)
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise APIError(400, "response_format other than {\"type\": \"text\"} (JSON mode, a JSON schema) is not "
                            "supported by this server: it has no guided decoding; ask for JSON in the prompt",
                            "response_format")
    max_tokens = _get_int(body, "max_tokens", None, lo=1)
    if kind == "chat":
        mct = _get_int(body, "max_completion_tokens", None, lo=1)
        max_tokens = mct if mct is not None else max_tokens
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options")
    stream = _get_bool(body, "stream", False)
    include_usage = bool(stream_options and _get_bool(stream_options, "include_usage", False))
    stop_token_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_token_ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32 for t in stop_token_ids
    ):
        raise APIError(400, "'stop_token_ids' must be a list of non-negative integers", "stop_token_ids")
    min_tokens = _get_int(body, "min_tokens", 0, lo=0)
    if max_tokens is not None and min_tokens > max_tokens:
        raise APIError(400, f"'min_tokens' ({min_tokens}) must not exceed 'max_tokens' ({max_tokens})", "min_tokens")
    top_k = _get_int(body, "top_k", 0, lo=-1)
    salt = body.get("cache_salt")
    if salt is not None and not isinstance(salt, str):
        raise APIError(400, "'cache_salt' must be a string", "cache_salt")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise APIError(400, "'user' must be a string", "user")
    kv_params = body.get("kv_transfer_params")
    if kv_params is not None and not isinstance(kv_params, dict):
        raise APIError(400, "'kv_transfer_params' must be an object (vLLM's disaggregated-serving field)",
                       "kv_transfer_params")
    return dict(
        kind=kind,
        model=model,
        n=n,
        logprobs=logprobs,
        echo=kind == "completion" and _get_bool(body, "echo", False),
        max_tokens=max_tokens,
        temperature=_get_float(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_get_float(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=top_k,
        seed=_get_int(body, "seed", None, lo=-(2**63), hi=2**63 - 1),
        stop=_get_stop(body),
        stop_token_ids=tuple(stop_token_ids),
        ignore_eos=_get_bool(body, "ignore_eos", False),
        min_tokens=min_tokens,
        stream=stream,
        include_usage=include_usage,
        cache_salt=salt,
        user=user,
        return_token_ids=_get_bool(body, "return_token_ids", False),
        kv_transfer_params=kv_params,
    )


def _get_logprobs(body: dict, kind: str) -> int | None:
    """How many top logprobs per token the client wants (0: the sampled token's alone), or
    None for none. Completions: `logprobs` is that number (OpenAI's legacy API, max 5 there, 20
    here as vLLM); chat: `logprobs` is a boolean and `top_logprobs` the number."""
    if kind == "completion":
        v = body.get("logprobs")
        if v is None or v is False:
            return None
        return _get_int(body, "logprobs", None, lo=0, hi=MAX_LOGPROBS)
    want = _get_bool(body, "logprobs", False)
    top = _get_int(body, "top_logprobs", None, lo=0, hi=MAX_LOGPROBS)
    if top and not want:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if want else None


def _one_prompt(prompt: Any) -> str | tuple[int, ...]:
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "'prompt' must not be empty", "prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(t < 0 or t >= 2**32 for t in prompt):
            raise APIError(400, "token ids in 'prompt' must be non-negative integers", "prompt")
        return tuple(prompt)
    raise APIError(400, "'prompt' must be a non-empty string, a non-empty list of token ids, or a list of "
                        "those (a batch)", "prompt")


def parse_completion(body: Any) -> GenerationRequest:
    fields = _common(body, "completion")
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError(400, "'prompt' is required", "prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > MAX_BATCH:
            raise APIError(400, f"a batched 'prompt' takes at most {MAX_BATCH} prompts", "prompt")
        prompts = [_one_prompt(p) for p in prompt]  # a batch (of one, maybe)
    else:
        prompts = [_one_prompt(prompt)]
    first, more = prompts[0], tuple(prompts[1:])
    if fields["echo"] and fields["logprobs"] is not None:
        raise APIError(400, "'echo' with 'logprobs' (prompt logprobs) is not supported by this server", "echo")
    if isinstance(first, str):
        return GenerationRequest(prompt=first, more_prompts=more, **fields)
    return GenerationRequest(prompt_token_ids=first, more_prompts=more, **fields)


_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def parse_chat(body: Any) -> GenerationRequest:
    fields = _common(body, "chat")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", "messages")
        if m.get("role") not in _ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {sorted(_ROLES)}", "messages")
        content = m.get("content")
        if content is None and m.get("role") == "assistant":
            continue
        if isinstance(content, str):
            continue
        if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
        ):
            continue
        raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
    return GenerationRequest(messages=tuple(messages), **fields)


# ------------------------------------------------------------------ the balancer's parse
# A proxy validates only what routing needs and forwards everything else unchanged: the replica
# behind it (kvfleet's, vLLM, SGLang) is the judge of the rest, and its 4xx reaches the client
# as it sent it. `parse_for_routing` reads the prompt to hash, the model, and hints for the load
# estimate; a hint of the wrong type is ignored here (the replica will refuse it).

# The fields a greedy stream's continuation carries exactly (balancer/failover.py builds it from
# them); a body with any other field (penalties over the output, guided decoding, logit
# processors, tools, logprobs...) cannot be continued token-identically on another replica.
_CONTINUABLE_FIELDS = frozenset({
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
    "seed", "stop", "stop_token_ids", "ignore_eos", "min_tokens", "stream", "stream_options", "cache_salt",
    "user", "return_token_ids", "n", "best_of", "logprobs", "top_logprobs", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "request_id", "priority", "skip_special_tokens", "echo",
})
# Those among them whose value must be the neutral one (as a client that never sent them).
_NEUTRAL = (("n", (None, 1)), ("best_of", (None, 1)), ("logprobs", (None, False)), ("top_logprobs", (None, 0)),
            ("presence_penalty", (None, 0)), ("frequency_penalty", (None, 0)), ("repetition_penalty", (None, 1)),
            ("echo", (None, False)), ("skip_special_tokens", (None, True)))


def _hint_int(body: dict, name: str) -> int | None:
    v = body.get(name)
    return v if type(v) is int and 0 < v <= _INT_LIMIT else None


def _continuable(body: dict, stop: tuple[str, ...], max_stop: int) -> bool:
    """True when a stream of this body, cut mid-way, can be continued token for token: greedy
    (temperature 0 or top_k 1), one sequence, no logprobs, nothing whose effect depends on the
    output so far, and at most `max_stop` stop strings (the balancer watches them itself)."""
    t, k = body.get("temperature"), body.get("top_k")
    greedy = (type(t) in (int, float) and t == 0) or (type(k) is int and k == 1)
    if not greedy or body.get("stream") is not True or len(stop) > max_stop:
        return False  # the cheap checks first: most requests are not greedy streams
    return _CONTINUABLE_FIELDS.issuperset(body) and not any(body.get(k) not in ok for k, ok in _NEUTRAL)


def _token_prompt(p: list) -> tuple[int, ...] | None:
    if p and all(type(t) is int and 0 <= t < 2**32 for t in p):
        return tuple(p)
    return None


def _responses_messages(body: dict) -> tuple[dict[str, Any], ...]:
    """The chat messages a Responses API body stands for: `instructions` as the system message,
    then `input` (a string, or message items whose content is a string or text parts)."""
    out: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str):
        out.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, dict) or not isinstance(item.get("role"), str):
            continue  # tool calls and their outputs: not text the prefix is made of
        content = item.get("content")
        if isinstance(content, list):
            content = "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        if isinstance(content, str):
            out.append({"role": item["role"], "content": content})
    if not out:
        raise APIError(400, "'input' must be a string or a list of message items", "input")
    return tuple(out)


def parse_for_routing(body: Any, kind: str, max_failover_stop: int = 64) -> GenerationRequest:
    """What a balancer needs of a completions (`kind="completion"`), chat or Responses API
    (`"responses"`) body: the model,
    the prompt or messages it hashes, and hints (max_tokens, n, stream, sampling for an exact
    failover). Refuses (400) only what cannot be routed: not a JSON object, a `model` that is
    not a string, no prompt or messages to hash. A batched prompt is routed by its first prompt."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "'model' must be a string", "model")
    max_tokens = _hint_int(body, "max_tokens")
    if kind == "chat":
        max_tokens = _hint_int(body, "max_completion_tokens") or max_tokens
    n = max(_hint_int(body, "n") or 1, _hint_int(body, "best_of") or 1)
    opts = body.get("stream_options")
    stop = body.get("stop")
    stop = (stop,) if isinstance(stop, str) else tuple(s for s in stop if isinstance(s, str)) \
        if isinstance(stop, list) else ()
    stop_ids = body.get("stop_token_ids")
    salt, user, seed = body.get("cache_salt"), body.get("user"), body.get("seed")
    t, top_p, top_k, min_tokens = (body.get("temperature"), body.get("top_p"), body.get("top_k"),
                                   body.get("min_tokens"))
    fields: dict[str, Any] = dict(
        kind=kind, model=model, max_tokens=max_tokens, n=n,
        temperature=float(t) if type(t) in (int, float) and math.isfinite(t) else 1.0,
        top_p=float(top_p) if type(top_p) in (int, float) and math.isfinite(top_p) else 1.0,
        top_k=top_k if type(top_k) is int else 0,
        seed=seed if type(seed) is int else None,
        stop=stop,
        stop_token_ids=tuple(x for x in stop_ids if type(x) is int) if isinstance(stop_ids, list) else (),
        ignore_eos=body.get("ignore_eos") is True,
        min_tokens=min_tokens if type(min_tokens) is int and min_tokens > 0 else 0,
        stream=body.get("stream") is True,
        include_usage=isinstance(opts, dict) and opts.get("include_usage") is True,
        cache_salt=salt if isinstance(salt, str) else None,
        user=user if isinstance(user, str) else None,
        return_token_ids=body.get("return_token_ids") is True,
        # failover continues completions and chat streams only (a Responses stream has its own events)
        continuable=kind != "responses" and _continuable(body, stop, max_failover_stop),
    )
    if kind == "responses":  # OpenAI's Responses API: routed as the chat it renders to
        fields.update(kind="chat", max_tokens=_hint_int(body, "max_output_tokens"))
        return GenerationRequest(messages=_responses_messages(body), **fields)
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
        return GenerationRequest(messages=tuple(messages), **fields)
    prompt = body.get("prompt")
    prompts = prompt if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt) \
        else [prompt]
    parsed: list[str | tuple[int, ...]] = []
    for p in prompts:
        tokens = _token_prompt(p) if isinstance(p, list) else None
        if isinstance(p, str):
            parsed.append(p)
        elif tokens is not None:
            parsed.append(tokens)
        elif p is None:
            raise APIError(400, "'prompt' is required", "prompt")
        else:
            raise APIError(400, "'prompt' must be a string, a list of token ids (0 <= id < 2**32), or a list "
                                "of those (a batch)", "prompt")
    if len(parsed) > 1:
        fields["continuable"] = False
    first, more = parsed[0], tuple(parsed[1:])
    if isinstance(first, str):
        return GenerationRequest(prompt=first, more_prompts=more, **fields)
    return GenerationRequest(prompt_token_ids=first, more_prompts=more, **fields)


# A non-streamed completion's `usage` object (the body's, compact JSON) in a response header as
# well, set by kvfleet replicas: the endpoint picker reads it there and then asks Envoy for no
# response body (balancer/picker/ext_proc.py), one ext_proc message less per request. kvfleet's
# own name; other engines send no such header, and their bodies are read as before.
USAGE_HEADER = "X-Kvfleet-Usage"


def usage_header(usage: dict[str, Any]) -> str:
    return json.dumps(usage, separators=(",", ":"))


def parse_usage_header(value: str | None) -> dict[str, Any] | None:
    """The usage object of a USAGE_HEADER value (None: absent or not a JSON object)."""
    if not value:
        return None
    try:
        usage = json.loads(value)
    except ValueError:
        return None
    return usage if isinstance(usage, dict) else None
