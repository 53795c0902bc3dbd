"""The balancer's public HTTP API as an OpenAPI 3.1 document, served at `GET /openapi.json`.

The request schemas describe what a kvfleet replica accepts (`protocol.openai_api`'s bounds),
so a client generator or a fuzzer (tests/test_openapi_fuzz.py) can derive valid and invalid
requests from it. The balancer itself checks only what routing needs and forwards the rest to
the replica, whose answer (a 4xx included) the client gets unchanged; fields the schemas do not
name (vLLM and SGLang extensions) are allowed by `additionalProperties`. Routes a vLLM server
serves besides generation (embeddings, responses, tokenize, detokenize, version, and any other
`/v1/*` route) are forwarded by load as they come.
"""

from __future__ import annotations

import json
from typing import Any

from balancer.exchange import JSON, Exchange, Handler
from protocol.openai_api import MAX_BATCH, MAX_LOGPROBS, MAX_N

VERSION = "0.1.0"
_INT32 = 2**31 - 1


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error_responses(*codes: int) -> dict[str, Any]:
    text = {400: "Invalid request (the message says what to change)", 401: "Missing or wrong API key",
            404: "Unknown model or replica", 408: "The request body arrived too slowly",
            413: "Request body too large", 429: "Per-key rate or concurrency limit (see Retry-After)",
            502: "Every replica tried failed", 503: "No usable replica, or the admission queue is full (Retry-After)"}
    return {str(c): {"description": text[c], "content": {"application/json": {"schema": _ref("Error")}}} for c in codes}


_SAMPLING = {
    "model": {"type": "string", "description": "must name a model the fleet serves (GET /v1/models) when given"},
    "max_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": _INT32},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2, "default": 1},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1},
    "top_k": {"type": "integer", "minimum": -1, "maximum": _INT32, "default": 0},
    "seed": {"type": ["integer", "null"], "minimum": -(2**63), "maximum": 2**63 - 1},
    "stop": {"oneOf": [{"type": "string", "minLength": 1},
                       {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 16}]},
    "stop_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1}},
    "ignore_eos": {"type": "boolean", "default": False},
    "min_tokens": {"type": "integer", "minimum": 0, "maximum": _INT32, "default": 0},
    "n": {"type": "integer", "minimum": 1, "maximum": MAX_N, "default": 1,
          "description": "samples per prompt (a kvfleet replica shares the prompt's prefill among them)"},
    "stream": {"type": "boolean", "default": False},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "cache_salt": {"type": "string"},
    "user": {"type": "string"},
    "return_token_ids": {"type": "boolean", "default": False, "description": "vLLM's extension"},
}

_COMPLETION_REQUEST = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "prompt": {"oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
             "description": "token ids"},
            {"type": "array", "minItems": 1, "maxItems": MAX_BATCH, "items": {"type": "string", "minLength": 1},
             "description": "a batch of prompts: n choices each, index = prompt * n + sample"},
        ]},
        **_SAMPLING,
        "logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_LOGPROBS,
                     "description": "top logprobs per token (OpenAI's legacy completions shape)"},
        "echo": {"type": "boolean", "default": False},
    },
    "additionalProperties": True,
}

_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"oneOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "object", "required": ["type", "text"],
                                        "properties": {"type": {"type": "string", "enum": ["text"]},
                                                       "text": {"type": "string"}}}},
        ]},
        "name": {"type": "string"},
    },
}

_CHAT_REQUEST = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage")},
        "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": _INT32},
        **_SAMPLING,
        "logprobs": {"type": "boolean", "default": False},
        "top_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_LOGPROBS,
                         "description": "needs logprobs: true"},
    },
    "additionalProperties": True,
}

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
        "code": {"type": "integer"}}}},
}

_GENERATION_RESPONSES = {
    "200": {"description": "The completion: JSON, or with `stream: true` server-sent events (`data: {...}` "
                           "chunks, then `data: [DONE]`). `X-Kvfleet-Replica` names the serving replica.",
            "content": {"application/json": {"schema": {"type": "object"}},
                        "text/event-stream": {"schema": {"type": "string"}}}},
    **_error_responses(400, 401, 404, 408, 413, 429, 502, 503),
}


def _post(summary: str, schema: str, responses: dict, op_id: str, tag: str) -> dict:
    return {"post": {"operationId": op_id, "summary": summary, "tags": [tag],
                     "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(schema)}}},
                     "responses": responses}}


_FORWARDED_RESPONSES = {
    "200": {"description": "The replica's answer, relayed as it is (`X-Kvfleet-Replica` names the replica)",
            "content": {"application/json": {"schema": {"type": "object"}}}},
    "404": {"description": "The replicas do not serve this route, or no replica serves the model",
            "content": {"application/json": {"schema": _ref("Error")}}},
    **{k: v for k, v in _error_responses(400, 401, 408, 413, 429, 502, 503).items()},
}


def _forwarded(summary: str, op_id: str, method: str = "post") -> dict:
    op: dict[str, Any] = {"operationId": op_id, "summary": summary + " (forwarded to a replica chosen by load)",
                          "tags": ["openai"], "responses": _FORWARDED_RESPONSES}
    if method == "post":
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "properties": {"model": {"type": "string"}}, "additionalProperties": True}}}}
    return {method: op}


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (a fresh dict)."""
    ok_json = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    replica_ref = {"type": "object", "required": ["replica"], "properties": {"replica": {"type": "string"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "kvfleet balancer", "version": VERSION,
                 "description": "OpenAI-compatible endpoint of a KV-cache-aware load balancer, and its admin API."},
        "components": {
            "schemas": {"CompletionRequest": _COMPLETION_REQUEST, "ChatCompletionRequest": _CHAT_REQUEST,
                        "ChatMessage": _MESSAGE, "Error": _ERROR,
                        "AddReplica": {"type": "object", "required": ["url"], "properties": {
                            "url": {"type": "string", "format": "uri"}, "events": {"type": ["string", "null"]},
                            "replay": {"type": ["string", "null"]}, "topic": {"type": "string"},
                            "curve_server_key": {"type": ["string", "null"]}}},
                        "ReplicaRef": replica_ref},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "Needed only when the balancer runs with --api-key "
                                                          "(/admin/*: --admin-key)"}},
        },
        "security": [{}, {"bearer": []}],
        "paths": {
            "/v1/completions": _post("Text completion (routed to the replica that caches the prompt best)",
                                     "CompletionRequest", _GENERATION_RESPONSES, "createCompletion", "openai"),
            "/v1/chat/completions": _post("Chat completion", "ChatCompletionRequest", _GENERATION_RESPONSES,
                                          "createChatCompletion", "openai"),
            "/v1/embeddings": _forwarded("Embeddings", "createEmbedding"),
            "/v1/responses": _forwarded("OpenAI Responses API", "createResponse"),
            "/tokenize": _forwarded("Tokenize (vLLM)", "tokenize"),
            "/detokenize": _forwarded("Detokenize (vLLM)", "detokenize"),
            "/version": _forwarded("The replicas' server version (vLLM)", "version", "get"),
            **{path: _forwarded(f"vLLM's {path}", "forward" + path.replace("/", "_")) for path in
               ("/pooling", "/classify", "/score", "/rerank", "/v2/rerank", "/invocations")},
            "/v1/models": {"get": {"operationId": "listModels", "tags": ["openai"],
                                   "summary": "Every model the healthy replicas serve (their /v1/models, merged)",
                                   "responses": {"200": ok_json, **_error_responses(401)}}},
            "/health": {"get": {"operationId": "health", "tags": ["ops"], "security": [{}],
                                "summary": "200 while at least one replica is usable, else 503",
                                "responses": {"200": ok_json, "503": ok_json}}},
            "/metrics": {"get": {"operationId": "metrics", "tags": ["ops"], "security": [{}],
                                 "summary": "Prometheus metrics",
                                 "responses": {"200": {"description": "Prometheus text format",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"operationId": "openapi", "tags": ["ops"], "security": [{}],
                                      "summary": "This document", "responses": {"200": ok_json}}},
            "/admin/replicas": {
                "get": {"operationId": "listReplicas", "tags": ["admin"], "summary": "Every replica's state",
                        "responses": {"200": ok_json, **_error_responses(401)}},
                "post": {"operationId": "addReplica", "tags": ["admin"], "summary": "Add a replica",
                         "requestBody": {"required": True,
                                         "content": {"application/json": {"schema": _ref("AddReplica")}}},
                         "responses": {"201": ok_json, **_error_responses(400, 401)}},
                "delete": {"operationId": "removeReplica", "tags": ["admin"],
                           "summary": "Drain a replica, wait for its requests (up to timeout s), remove it",
                           "parameters": [
                               {"name": "replica", "in": "query", "required": True, "schema": {"type": "string"}},
                               {"name": "timeout", "in": "query", "schema": {"type": "number", "minimum": 0}}],
                           "responses": {"200": ok_json, **_error_responses(400, 401, 404)}},
            },
            "/admin/replicas/drain": _post("Stop sending a replica new requests", "ReplicaRef",
                                           {"200": ok_json, **_error_responses(400, 401, 404)}, "drainReplica",
                                           "admin"),
            "/admin/replicas/undrain": _post("Send a drained replica requests again", "ReplicaRef",
                                             {"200": ok_json, **_error_responses(400, 401, 404)}, "undrainReplica",
                                             "admin"),
            "/admin/explain": {"post": {
                "operationId": "explain", "tags": ["admin"],
                "summary": "How a completions or chat body would be routed, without sending it",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "oneOf": [_ref("CompletionRequest"), _ref("ChatCompletionRequest")]}}}},
                "responses": {"200": ok_json, **_error_responses(400, 401, 404)}}},
            "/admin/decisions": {"get": {
                "operationId": "decisions", "tags": ["admin"],
                "summary": "The latest routed requests: chosen replica, predicted / best offered / delivered cached "
                           "tokens, whether they disagreed, the policy's reason and scores",
                "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}}],
                "responses": {"200": ok_json, **_error_responses(400, 401)}}},
            "/admin/sessions": {
                "get": {"operationId": "listSessions", "tags": ["admin"],
                        "summary": "Sticky sessions and their home replicas, most recently used first (?key=K: one)",
                        "parameters": [{"name": "key", "in": "query", "schema": {"type": "string"}},
                                       {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}}],
                        "responses": {"200": ok_json, **_error_responses(400, 401, 404)}},
                "delete": {"operationId": "releaseSession", "tags": ["admin"],
                           "summary": "Release a sticky session: its next request is a new session",
                           "parameters": [{"name": "key", "in": "query", "required": True,
                                           "schema": {"type": "string"}}],
                           "responses": {"200": ok_json, **_error_responses(400, 401, 404)}},
            },
            "/admin/index": {"get": {
                "operationId": "indexState", "tags": ["admin"],
                "summary": "The block hashes the prefix index holds for one replica",
                "parameters": [{"name": "replica", "in": "query", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": ok_json, **_error_responses(401, 404)}}},
        },
    }


def routes() -> dict[str, dict[str, Handler]]:
    body = json.dumps(document()).encode()

    async def openapi(ex: Exchange) -> None:
        ex.reply(200, body, dict(JSON))

    return {"/openapi.json": {"GET": openapi}}
