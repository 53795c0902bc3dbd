"""BalancerPredictor: a Predictor behind the two hooks the balancer's Router and the simulator
already call.

    Router.routing_request:        predicted = predictor.predict_point(prepared)
    FleetSimulation (on finish):   predictor.observe_done(routing_request, output_tokens)

`prepared` is a balancer.router.Prepared (token_ids, block_hashes, request.max_tokens) and
`routing_request` a balancer.policies.base.RoutingRequest (prompt_tokens, block_hashes,
max_tokens); both give the same Features, built from the fields the two share, plus the fixed
`model` this balancer serves and, with `text_ngrams=True`, the hashed word bigrams of the first
user message (chat requests; ~10 µs more per call). Duck-typed: nothing here imports the balancer.

    from predictors import make_predictor
    from predictors.adapter import BalancerPredictor
    router = Router(..., predictor=BalancerPredictor(make_predictor("ensemble"), model="llama-3-8b"))
"""

from __future__ import annotations

from predictors.base import Features, Prediction, Predictor
from predictors.features import hash_ngrams


class BalancerPredictor:
    def __init__(self, predictor: Predictor, model: str | None = None, text_ngrams: bool = False) -> None:
        self.predictor = predictor
        self.model = model
        self.text_ngrams = text_ngrams

    def features(self, request) -> Features:
        """Features of a Router `Prepared` or a `RoutingRequest` (equal for the same request)."""
        if hasattr(request, "token_ids"):  # Prepared
            prompt_tokens, max_tokens = len(request.token_ids), request.request.max_tokens
        else:  # RoutingRequest
            prompt_tokens, max_tokens = request.prompt_tokens, request.max_tokens
        ngrams = hash_ngrams(request.first_user_message) if self.text_ngrams else ()
        return Features(prompt_tokens=prompt_tokens, block_hashes=tuple(request.block_hashes),
                        max_tokens=max_tokens, model=self.model, text_ngrams=ngrams)

    def predict(self, request) -> Prediction:
        return self.predictor.predict(self.features(request))

    def predict_point(self, request) -> float:
        """The point estimate in tokens (what RoutingRequest.predicted_output_tokens carries)."""
        return self.predictor.predict(self.features(request)).tokens

    def observe_done(self, request, output_tokens: int) -> None:
        """The request finished having generated output_tokens."""
        self.predictor.observe(self.features(request), output_tokens)


def balancer_predictor(name: str, model: str | None = None) -> BalancerPredictor | None:
    """The output-length predictor `name` (`predictors.make_predictor`) behind the balancer's
    hooks, as the balancer, the simulator and the benchmarks build it; None for "none"."""
    if name == "none":
        return None
    from predictors import make_predictor

    return BalancerPredictor(make_predictor(name), model=model)
