"""What the balancer reads of a request (protocol.openai_api.parse_for_routing, issue #20): only
what routing needs, hints of the wrong type ignored (the replica judges them), and which streams
can be continued exactly on another replica."""

from __future__ import annotations

import pytest

from protocol.openai_api import APIError, parse_for_routing

P = {"model": "m", "prompt": "hi", "stream": True, "temperature": 0}


def test_only_what_cannot_be_routed_is_refused():
    for body in ([1], "x", {"model": 5, "prompt": "x"}, {"prompt": None}, {"prompt": [-1]}, {"prompt": {"a": 1}},
                 {"prompt": []}):
        with pytest.raises(APIError) as e:
            parse_for_routing(body, "completion")
        assert e.value.status == 400
    with pytest.raises(APIError):
        parse_for_routing({"messages": []}, "chat")
    # Everything a replica may refuse passes: the replica answers it.
    req = parse_for_routing({"prompt": "", "max_tokens": "ten", "temperature": "hot", "n": -3, "stop": [1, "s"],
                             "seed": 1.5, "logit_bias": {"1": 100}}, "completion")
    assert (req.prompt, req.max_tokens, req.temperature, req.n, req.stop, req.seed) == ("", None, 1.0, 1, ("s",),
                                                                                          None)


def test_hints_for_the_load_estimate():
    req = parse_for_routing({"prompt": ["a", [1, 2], "b"], "n": 2, "best_of": 4, "max_tokens": 9}, "completion")
    assert (req.prompt, req.more_prompts, req.n, req.max_tokens) == ("a", ((1, 2), "b"), 4, 9)
    chat = parse_for_routing({"messages": [{"role": "critic", "content": [{"type": "image_url"}]}],
                              "max_completion_tokens": 5, "max_tokens": 7}, "chat")
    assert chat.max_tokens == 5 and chat.messages[0]["role"] == "critic"
    resp = parse_for_routing({"instructions": "Be brief.", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "hi"}]}, {"type": "function_call_output"}],
        "max_output_tokens": 11}, "responses")
    assert resp.messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"})
    assert resp.max_tokens == 11 and not resp.continuable


@pytest.mark.parametrize("extra, continuable", [
    ({}, True),
    ({"top_k": 1, "temperature": 0.7}, True),  # top_k 1 is greedy too
    ({"n": 1, "logprobs": None, "presence_penalty": 0, "seed": 3, "stop": ["x"] * 64}, True),
    ({"temperature": 0.7}, False),
    ({"n": 2}, False),
    ({"logprobs": 1}, False),
    ({"top_logprobs": 2}, False),
    ({"frequency_penalty": 0.5}, False),  # its effect depends on the output so far
    ({"response_format": {"type": "json_object"}}, False),
    ({"some_unknown_field": 1}, False),
    ({"stop": ["x"] * 65}, False),  # above failover_max_stop
    ({"stream": False}, False),
    ({"prompt": ["a", "b"]}, False),
])
def test_which_streams_can_be_continued_exactly(extra, continuable):
    assert parse_for_routing({**P, **extra}, "completion", max_failover_stop=64).continuable is continuable
