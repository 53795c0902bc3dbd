"""Output-length predictors behind one small interface, and their evaluation. Torch-free.

    from predictors import Features, make_predictor
    p = make_predictor("ensemble")
    f = Features(prompt_tokens=812, block_hashes=rr.block_hashes, max_tokens=rr.max_tokens)
    p.predict(f)            # Prediction(tokens=..., p10=..., p50=..., p90=..., source="prefix:8")
    p.observe(f, 137)       # when the request ends, with the same Features

Modules:
    base            Features, Prediction, the Predictor interface
    window          bounded structures: RollingWindow (exact windowed quantiles), LruTable, RecentRing
    baselines       GlobalMedian, MaxTokensCap
    prefix_history  PrefixHistory: recent lengths of the longest already-seen prefix, backing off
    regressor       OnlineRegressor: hashed-feature quantile regression of log(length), AdaGrad
    ensemble        Ensemble: members weighted by their recent absolute error, per context
    calibrated      Calibrated: p10 / p90 corrected online so ~10 % fall on each side
    features        Features from a RoutingRequest or a trace row; hashed text n-grams
    adapter         BalancerPredictor: the Router's predict_point / observe_done hooks
    metrics         MAE, relative error, Kendall tau (O(n log n)), bucket accuracy, coverage
    evaluate        online (prequential) evaluation over a trace; `kvfleet predict eval`
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from predictors.base import QUANTILES, Features, Prediction, Predictor
from predictors.baselines import GlobalMedian, GlobalMedianConfig, MaxTokensCap
from predictors.calibrated import Calibrated, CalibrationConfig
from predictors.ensemble import Ensemble, EnsembleConfig
from predictors.prefix_history import PrefixHistory, PrefixHistoryConfig
from predictors.regressor import OnlineRegressor, OnlineRegressorConfig


def _ensemble() -> Ensemble:
    return Ensemble([PrefixHistory(), OnlineRegressor(), GlobalMedian()])


# The learned predictors come with online-calibrated intervals (calibrated.py); the baselines as
# they are, so that they stay the plain reference.
PREDICTORS: Mapping[str, Callable[[], Predictor]] = MappingProxyType({
    GlobalMedian.name: GlobalMedian,
    MaxTokensCap.name: MaxTokensCap,
    PrefixHistory.name: lambda: Calibrated(PrefixHistory()),
    OnlineRegressor.name: lambda: Calibrated(OnlineRegressor()),
    Ensemble.name: lambda: Calibrated(_ensemble()),
})

BASELINE = GlobalMedian.name


def predictor_names() -> tuple[str, ...]:
    return tuple(PREDICTORS)


def make_predictor(name: str) -> Predictor:
    """A fresh predictor with its default config. `ensemble` = prefix_history + online_regressor +
    global_median; the three learned ones are wrapped in `Calibrated` (p10/p90 corrected online to
    ~80 % coverage; the point estimate is untouched). Raises ValueError naming the choices for an
    unknown name."""
    try:
        factory = PREDICTORS[name]
    except KeyError:
        raise ValueError(f"unknown predictor {name!r}; choose from {', '.join(PREDICTORS)}") from None
    return factory()


__all__ = [
    "QUANTILES", "BASELINE", "PREDICTORS", "Calibrated", "CalibrationConfig", "Ensemble", "EnsembleConfig", "Features", "GlobalMedian",
    "GlobalMedianConfig", "MaxTokensCap", "OnlineRegressor", "OnlineRegressorConfig", "Prediction", "Predictor",
    "PrefixHistory", "PrefixHistoryConfig", "make_predictor", "predictor_names",
]
