"""Every class of configuration mistake is reported before anything is built, naming the key."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap

import pytest

from megarl import config as cfg
from megarl.config import ConfigError, load_config, to_yaml

REQUIRED = ["model.hf_dir=/models/tiny"]


def _yaml(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _error(*args, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        load_config(*args, **kwargs)
    return err.value


def test_defaults_follow_the_spec():
    c = load_config(overrides=REQUIRED)
    assert (c.entropy.clip_cov_ratio, c.entropy.cov_lb, c.entropy.cov_ub) == (2e-4, 1.0, 5.0)
    assert (c.entropy.kl_cov_ratio, c.entropy.kl_cov_coef) == (2e-4, 1.0)
    assert (c.entropy.siren_top_p, c.entropy.siren_mask_quantile, c.entropy.siren_coef) == (
        0.8, 0.8, 0.005)
    assert (c.entropy.aer_target_ratio, c.entropy.aer_lr, c.entropy.aer_alpha_init,
            c.entropy.aer_alpha_max) == (0.4, 1e-3, 0.0, 1e-2)
    assert c.entropy.nucleus_rule == "inclusive" and c.entropy.nucleus_top_k == 1024
    assert c.algorithm.dual_clip_c == 3.0 and c.algorithm.kl_estimator == "k3"


def test_unknown_key_in_yaml_names_file_line_and_closest_key(tmp_path):
    path = _yaml(tmp_path, """\
        model:
          hf_dir: /m
        algorithm:
          advantage: grpo
          clip_eps_hgh: 0.28
    """)
    err = _error(path)
    assert err.key == "algorithm.clip_eps_hgh"
    assert f"{path}:5" in str(err) and "did you mean 'algorithm.clip_eps_high'" in str(err)


def test_unknown_section_and_section_given_a_value(tmp_path):
    err = _error(overrides=REQUIRED + ["entropi.intervention=siren"])
    assert err.key == "entropi" and "did you mean 'entropy'" in str(err)
    err = _error(_yaml(tmp_path, "model: 3\n"))
    assert err.key == "model" and "is a section" in str(err)


def test_wrong_type_names_the_key():
    err = _error(overrides=REQUIRED + ["algorithm.clip_eps_low=abc"])
    assert err.key == "algorithm.clip_eps_low" and "'abc'" in str(err)
    err = _error(overrides=REQUIRED + ["rollout.server_urls=http://a:1"])
    assert err.key == "rollout.server_urls"


def test_missing_required_value():
    err = _error(overrides=["parallel.tp=2"])
    assert err.key == "model.hf_dir" and "is required" in str(err)


@pytest.mark.parametrize("override, key, text", [
    ("entropy.siren_top_p=1.5", "entropy.siren_top_p", "must be in (0, 1]"),
    ("entropy.siren_top_p=0", "entropy.siren_top_p", "must be in (0, 1]"),
    ("entropy.cov_lb=6", "entropy.cov_lb", "must be below entropy.cov_ub"),
    ("entropy.entropy_coef=-1", "entropy.entropy_coef", "must be in [0, inf)"),
    ("optimizer.lr=0", "optimizer.lr", "must be in (0, inf)"),
    ("entropy.intervention=sirne", "entropy.intervention", "is not one of none"),
    ("algorithm.loss_agg_mode=mean", "algorithm.loss_agg_mode", "'token-mean'"),
    ("rollout.top_p=1.2", "rollout.top_p", "must be in (0, 1]"),
    ("eval.k=[1,8]", "eval.k[1]", "must be in [1, eval.samples_per_problem = 4]"),
    ("data.train_files=[a.csv]", "data.train_files[0]", "not a .jsonl"),
])
def test_out_of_range_values(override, key, text):
    err = _error(overrides=REQUIRED + [override])
    assert err.key == key and text in str(err)


@pytest.mark.parametrize("overrides, key", [
    (["rollout.samples_per_prompt=1"], "rollout.samples_per_prompt"),
    (["sync.transport=colocated"], "sync.transport"),
    (["rollout.mode=colocated", "rollout.backend=dev"], "rollout.mode"),
    (["parallel.vpp=2"], "parallel.vpp"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel"),
    (["algorithm.prompts_per_mini_batch=5"], "algorithm.prompts_per_mini_batch"),
    (["entropy.intervention=no.such.module:Thing"], "entropy.intervention"),
    (["reward.function=math_verify"], "reward.function"),
])
def test_incompatible_combinations(overrides, key):
    assert _error(overrides=REQUIRED + overrides).key == key


def test_bad_override_syntax():
    assert "is not of the form" in str(_error(overrides=["model.hf_dir"]))
    assert _error(overrides=["parallel=2"]).key == "parallel"


def test_missing_or_broken_file(tmp_path):
    assert "does not exist" in str(_error(tmp_path / "nope.yaml"))
    assert "not valid YAML" in str(_error(_yaml(tmp_path, "model: [\n")))


def test_yaml_then_overrides_and_round_trip(tmp_path):
    path = _yaml(tmp_path, """\
        model: {hf_dir: /m, dtype: float32}
        parallel: {tp: 2}
        rollout: {server_args: {chunked_prefill_size: 8192, enable_metrics: true}}
        entropy: {intervention: siren}
    """)
    c = load_config(path, ["parallel.tp=4", "entropy.siren_top_p=0.9",
                           "rollout.server_urls=[http://h1:30000,http://h2:30000]"])
    assert c.parallel.tp == 4 and c.model.dtype == "float32"
    assert c.rollout.server_urls == ["http://h1:30000", "http://h2:30000"]
    assert c.entropy.siren_top_p == 0.9
    assert c.rollout.server_args == {"chunked_prefill_size": 8192, "enable_metrics": True}
    again = _yaml(tmp_path, to_yaml(c))
    assert load_config(again) == c


def test_every_field_has_a_docstring():
    sections = [cfg.MegarlConfig] + [f.type if isinstance(f.type, type) else getattr(cfg, f.type)
                                     for f in dataclasses.fields(cfg.MegarlConfig)]
    for cls in sections:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        body = tree.body[0].body
        documented = {
            stmt.target.id for stmt, nxt in zip(body, body[1:])
            if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)
        }
        missing = {f.name for f in dataclasses.fields(cls)} - documented
        assert not missing, f"{cls.__name__} fields without a docstring: {sorted(missing)}"


def test_sections_are_keyword_only():
    with pytest.raises(TypeError):
        cfg.ParallelConfig(2)


def test_colocated_mode_needs_the_colocated_transport():
    err = _error(overrides=REQUIRED + ["rollout.mode=colocated"])
    assert err.key == "sync.transport"
