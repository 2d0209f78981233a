"""The intervention interface: registry, a user intervention loaded by dotted path, the errors a
misfit gets, the statistics request, state round-trips and resuming, and config validation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megarl.config import AlgorithmConfig, ConfigError, EntropyConfig, RolloutConfig, from_dict
from megarl.losses import REGISTRY, Intervention, Metrics, StatsRequest, build_loss
from tests.unit.test_losses_reference import make_tokens, ref_weights, run_step, valid

HERE = "tests.unit.test_interventions_contract"


class NucleusPenalty(Intervention):
    """A user intervention: `coef * agg(H_p)` at its own top-p, counting its steps."""

    name = "nucleus_penalty"

    def __init__(self, config, *, seed=0, coef=1.0, top_p=0.5):
        super().__init__(config, seed=seed)
        self.coef, self.top_p = coef, top_p
        self.steps_seen = 0

    def stats_request(self):
        return StatsRequest(nucleus_top_p=self.top_p)

    def loss(self, inputs):
        metrics = Metrics()
        metrics.add("nucleus_penalty/steps", self.steps_seen)
        return self.coef * inputs.agg(inputs.nucleus_entropy), metrics

    def end_step(self, step):
        self.steps_seen += 1

    def state_dict(self):
        return {"steps_seen": self.steps_seen}


class NotAnIntervention:
    def loss(self, inputs):
        return 0


class Incomplete(Intervention):
    """Forgets `loss`."""


def build(intervention, seed=0, **entropy):
    return build_loss(AlgorithmConfig(), EntropyConfig(intervention=intervention, **entropy),
                      RolloutConfig(max_new_tokens=8), seed=seed)


def test_builtins_are_registered_by_their_config_names():
    assert set(REGISTRY) == {"none", "entropy_bonus", "clip_cov", "kl_cov", "siren", "aer"}


def test_user_intervention_by_dotted_path_gets_its_stats_options_and_hooks():
    obj = build(f"{HERE}:NucleusPenalty", options={"coef": 0.25, "top_p": 0.6},
                nucleus_rule="exclusive", nucleus_top_k=64)
    kwargs = obj.stats_kwargs
    assert kwargs["nucleus_top_p"] == 0.6 and kwargs["entropy"] and kwargs["log_probs"]
    assert (kwargs["nucleus_rule"], kwargs["nucleus_top_k"]) == ("exclusive", 64)
    tokens = make_tokens(20, [4, 6])
    loss, metrics, (stats,) = run_step(obj, [tokens])
    w = ref_weights(tokens, "token-mean", len(valid(tokens)), 2, 8)
    expected = {t: 0.25 * w[t] for t in valid(tokens)}
    grad = stats.nucleus_entropy.grad
    assert all(math.isclose(float(grad[t]), expected[t], rel_tol=1e-6) for t in valid(tokens))
    assert metrics.reduce()["nucleus_penalty/steps"] == 0
    run_step(obj, [tokens])
    assert obj.state_dict()["intervention"] == {"steps_seen": 2}


def test_nucleus_is_only_requested_by_interventions_that_need_it():
    assert "nucleus_top_p" not in build("none").stats_kwargs
    assert "nucleus_top_p" not in build("siren", siren_use_nucleus=False).stats_kwargs
    assert build("siren", siren_top_p=0.7).stats_kwargs["nucleus_top_p"] == 0.7
    assert build("entropy_bonus").stats_kwargs["entropy"]


@pytest.mark.parametrize("path,key,match", [
    (f"{HERE}:NotAnIntervention", "entropy.intervention", "not a subclass"),
    (f"{HERE}:Incomplete", "entropy.intervention", "does not implement loss"),
    (f"{HERE}:NoSuchClass", "entropy.intervention", "has no attribute"),
    ("tests.unit.no_such_module:Thing", "entropy.intervention", "cannot import"),
    (f"{HERE}:make_tokens", "entropy.intervention", "not a subclass"),
])
def test_misfits_fail_naming_the_config_key(path, key, match):
    with pytest.raises(ConfigError, match=match) as err:
        build(path)
    assert err.value.key == key


def test_wrong_options_fail_naming_entropy_options():
    with pytest.raises(ConfigError, match="cannot be built") as err:
        build(f"{HERE}:NucleusPenalty", options={"coeff": 1.0})
    assert err.value.key == "entropy.options"


def test_config_load_checks_the_user_class():
    base = {"model": {"hf_dir": "/models/tiny"}}
    from_dict({**base, "entropy": {"intervention": f"{HERE}:NucleusPenalty"}})
    with pytest.raises(ConfigError, match="not a class") as err:
        from_dict({**base, "entropy": {"intervention": f"{HERE}:HERE"}})
    assert err.value.key == "entropy.intervention"
    with pytest.raises(ConfigError, match="lacks") as err:
        from_dict({**base, "entropy": {"intervention": f"{HERE}:NotAnIntervention"}})


@pytest.mark.parametrize("override,key", [
    ({"siren_top_p": 0.0}, "entropy.siren_top_p"), ({"siren_top_p": 1.5}, "entropy.siren_top_p"),
    ({"siren_mask_quantile": 1.2}, "entropy.siren_mask_quantile"),
    ({"cov_lb": 5.0, "cov_ub": 5.0}, "entropy.cov_lb"), ({"kl_cov_coef": -1.0}, "entropy.kl_cov_coef"),
    ({"entropy_coef": -1e-3}, "entropy.entropy_coef"), ({"siren_coef": -1.0}, "entropy.siren_coef"),
    ({"clip_cov_ratio": 0.0}, "entropy.clip_cov_ratio"), ({"cov_scope": "dp"}, "entropy.cov_scope"),
    ({"nucleus_rule": "strict"}, "entropy.nucleus_rule"), ({"aer_alpha_init": 1.0}, "entropy.aer_alpha_init"),
    ({"intervention": "siren", "options": {"x": 1}}, "entropy.options"),
])
def test_entropy_config_rejects_bad_values(override, key):
    with pytest.raises(ConfigError) as err:
        EntropyConfig(**override).validate()
    assert err.value.key == key


def test_defaults_are_the_specs():
    e, a = EntropyConfig(), AlgorithmConfig()
    assert (e.clip_cov_ratio, e.cov_lb, e.cov_ub, e.cov_scope) == (2e-4, 1.0, 5.0, "local")
    assert (e.kl_cov_ratio, e.kl_cov_coef) == (2e-4, 1.0)
    assert (e.siren_top_p, e.siren_mask_quantile, e.siren_coef) == (0.8, 0.8, 0.005)
    assert (e.aer_target_ratio, e.aer_lr, e.aer_alpha_init, e.aer_alpha_max) == (0.4, 1e-3, 0.0, 1e-2)
    assert (a.dual_clip_c, a.kl_estimator, e.nucleus_rule, e.nucleus_top_k) == (3.0, "k3", "inclusive", 1024)


@pytest.mark.parametrize("intervention,settings", [
    ("siren", {}), ("aer", {"aer_alpha_init": 0.002, "aer_lr": 0.05}),
    ("clip_cov", {"clip_cov_ratio": 0.05, "cov_lb": -10.0, "cov_ub": 10.0}),
])
def test_state_round_trips_and_a_resumed_run_continues_identically(intervention, settings):
    batches = [make_tokens(30 + i, [5, 7, 6, 4], groups=[0, 0, 1, 1],
                           rewards=[1.0, 0.0, 0.0, float(i % 2)]) for i in range(4)]
    for late in batches[2:]:  # entropy falls: off SIREN's anchor, below AER's target
        late.H, late.Hp = late.H * 0.2, late.Hp * 0.3
    straight = build(intervention, seed=5, **settings)
    first = [run_step(straight, [b]) for b in batches[:2]]
    saved = json.loads(json.dumps(straight.state_dict()))  # plain values, as in a checkpoint
    rest = [run_step(straight, [b]) for b in batches[2:]]

    resumed = build(intervention, seed=5, **settings)
    resumed.load_state_dict(saved)
    assert resumed.state_dict() == saved
    again = [run_step(resumed, [b]) for b in batches[2:]]
    for (loss, _, stats), (loss2, _, stats2) in zip(rest, again):
        assert loss == loss2
        for name in ("log_probs", "entropy", "nucleus_entropy"):
            g, g2 = getattr(stats[0], name).grad, getattr(stats2[0], name).grad
            assert (g is None and g2 is None) or torch.equal(g, g2)
    assert resumed.state_dict() == straight.state_dict()
    before, after = saved["intervention"], resumed.state_dict()["intervention"]
    if intervention == "siren":  # measured once, then kept (and it shapes the later gradients)
        assert after["anchor"] == before["anchor"] is not None
        assert rest[0][2][0].nucleus_entropy.grad.abs().sum() > 0
    elif intervention == "aer":
        assert after["alpha"] != before["alpha"] and after["initial_entropy"] == before["initial_entropy"]
    else:
        assert after["draws"] == before["draws"] + 2
    assert len(first) == 2 and saved["num_steps"] == 2


def test_loading_unknown_state_fails():
    with pytest.raises(KeyError, match="unexpected state keys"):
        build("siren").intervention.load_state_dict({"anchor": 1.0, "alpha": 2.0})
