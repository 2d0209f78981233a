"""Entropy interventions by name: the built-in ones and user classes loaded by dotted path.

`entropy.intervention` is one of `none`, `entropy_bonus`, `clip_cov`, `kl_cov`, `siren`, `aer`
or `package.module:ClassName`, a subclass of `Intervention` constructed as
`ClassName(entropy_config, seed=seed, **entropy.options)`.
"""

from __future__ import annotations

import inspect

from ...config.errors import ConfigError
from ...config.validate import load_dotted
from .aer import Aer
from .base import Intervention, LossInputs, StatsRequest, StepContext, zero_loss
from .bonus import EntropyBonus, NoIntervention
from .covariance import ClipCov, KLCov
from .siren import Siren

REGISTRY: dict[str, type[Intervention]] = {
    cls.name: cls for cls in (NoIntervention, EntropyBonus, ClipCov, KLCov, Siren, Aer)
}


def resolve_intervention(name: str) -> type[Intervention]:
    """The class for `entropy.intervention`; a ConfigError naming the key if it does not fit."""
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" not in name:
        raise ConfigError("entropy.intervention",
                          f"{name!r} is not one of {', '.join(REGISTRY)} nor a dotted path "
                          "'package.module:ClassName'")
    cls = load_dotted(name, "entropy.intervention")
    if not (inspect.isclass(cls) and issubclass(cls, Intervention)):
        raise ConfigError("entropy.intervention",
                          f"{name!r} is {cls!r}, not a subclass of "
                          "megarl.losses.interventions.Intervention")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise ConfigError("entropy.intervention", f"{name!r} does not implement {missing}")
    return cls


def build_intervention(entropy_cfg, *, seed: int) -> Intervention:
    """The configured intervention, constructed and checked."""
    cls = resolve_intervention(entropy_cfg.intervention)
    options = dict(entropy_cfg.options or {})
    try:
        inspect.signature(cls).bind(entropy_cfg, seed=seed, **options)
    except TypeError as exc:
        raise ConfigError("entropy.options",
                          f"{entropy_cfg.intervention!r} cannot be built as "
                          f"{cls.__name__}(config, seed=..., **options) with options "
                          f"{sorted(options)}: {exc}") from None
    intervention = cls(entropy_cfg, seed=seed, **options)
    request = intervention.stats_request()
    if not isinstance(request, StatsRequest):
        raise ConfigError("entropy.intervention",
                          f"{cls.__name__}.stats_request() returned {request!r}, not a StatsRequest")
    return intervention


__all__ = [
    "Aer", "ClipCov", "EntropyBonus", "Intervention", "KLCov", "LossInputs", "NoIntervention",
    "REGISTRY", "Siren", "StatsRequest", "StepContext", "build_intervention",
    "resolve_intervention", "zero_loss",
]
