"""megarl's SGLang payloads against the fields recorded from SGLang's source.

tests/fixtures/sglang_protocol.json was written by tests/fixtures/record_sglang_protocol.py from
the pinned SGLang release. Every payload megarl sends must use only keys of the endpoint's
request class, include its required keys, and have values of the recorded types; sampling
parameters must fit api/v1's SamplingParams, which rejects unknown keys. Replies are checked
the other way: the dev server's reply keys must be keys SGLang's reply has.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest

from megarl.rollout import protocol as P
from megarl.rollout.servers import router_command, sglang_server_command

FIXTURE = json.loads((Path(__file__).parents[1] / "fixtures" / "sglang_protocol.json").read_text())


class TypeMismatch(AssertionError):
    pass


def fits(value: Any, annotation: str) -> None:
    """Raise TypeMismatch unless `value` (decoded JSON) fits the recorded annotation."""
    _fits(value, ast.parse(annotation, mode="eval").body, annotation)


def _fits(value: Any, node: ast.expr, where: str) -> None:
    if isinstance(node, ast.Constant) and node.value is None:
        if value is not None:
            raise TypeMismatch(f"{value!r} is not None ({where})")
        return
    if isinstance(node, ast.Name):
        return _fits_name(value, node.id, where)
    if isinstance(node, ast.Subscript):
        head = ast.unparse(node.value)
        args = list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]
        if head == "Annotated":
            base = ast.unparse(args[0])
            if any("Base64Bytes" in ast.unparse(a) for a in args[1:]):
                base = base.replace("bytes", "str")  # JSON carries bytes as base64 text
            return _fits(value, ast.parse(base, mode="eval").body, where)
        if head in ("Optional", "Union"):
            options = args + ([ast.Constant(None)] if head == "Optional" else [])
            for option in options:
                try:
                    return _fits(value, option, where)
                except TypeMismatch:
                    continue
            raise TypeMismatch(f"{value!r:.60} fits none of {ast.unparse(node)} ({where})")
        if head in ("List", "list"):
            if not isinstance(value, list):
                raise TypeMismatch(f"{value!r:.60} is not a list ({where})")
            for item in value:
                _fits(item, args[0], where)
            return
        if head in ("Dict", "dict"):
            if not isinstance(value, dict):
                raise TypeMismatch(f"{value!r:.60} is not an object ({where})")
            for v in value.values():
                _fits(v, args[1], where)
            return
        if head == "Literal":
            if value not in [ast.literal_eval(a) for a in args]:
                raise TypeMismatch(f"{value!r} is not one of {ast.unparse(node)} ({where})")
            return
    raise TypeMismatch(f"unsupported annotation {ast.unparse(node)} ({where})")


_SCALARS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _fits_name(value: Any, name: str, where: str) -> None:
    if name == "Any":
        return
    if name in _SCALARS:
        ok = isinstance(value, _SCALARS[name]) and (name == "bool" or not isinstance(value, bool))
        if not ok:
            raise TypeMismatch(f"{value!r:.60} is not {name} ({where})")
        return
    if name in FIXTURE["api_v1_aliases"]:
        return fits(value, FIXTURE["api_v1_aliases"][name])
    if name in FIXTURE["api_v1"]:
        return check_object(value, FIXTURE["api_v1"][name], f"api_v1.{name}")
    raise TypeMismatch(f"type {name!r} is not recorded ({where}): re-record the fixture")


def check_object(payload: dict, spec: dict, what: str) -> None:
    """Only known keys (even where SGLang would ignore unknown ones), required keys present,
    values of the recorded types."""
    fields = spec["fields"]
    if spec.get("json_form") == "array":  # positional: one value per field, in field order
        if not isinstance(payload, list) or len(payload) != len(fields):
            raise TypeMismatch(f"{what}: {payload!r:.60} is not a {len(fields)}-element array")
        payload = dict(zip(fields, payload))
    if not isinstance(payload, dict):
        raise TypeMismatch(f"{what}: {payload!r:.60} is not an object")
    unknown = sorted(set(payload) - set(fields))
    if unknown:
        raise TypeMismatch(f"{what}: keys {unknown} are not fields of SGLang "
                           f"{FIXTURE['sglang_version']}")
    missing = sorted(k for k, f in fields.items() if f["required"] and k not in payload)
    if missing:
        raise TypeMismatch(f"{what}: required keys {missing} are missing")
    for key, value in payload.items():
        fits(value, fields[key]["type"])


def check_request(endpoint: str, payload: dict) -> None:
    route = FIXTURE["routes"][endpoint]
    assert "POST" in route["methods"], f"{endpoint} does not take POST in SGLang"
    check_object(payload, FIXTURE["io_struct"][route["request_class"]],
                 f"{endpoint} ({route['request_class']})")


SAMPLING = P.SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=64,
                            stop=("</answer>",), stop_token_ids=(7,), seed=3)


def test_fixture_is_the_pinned_version():
    assert FIXTURE["sglang_version"] == P.SGLANG_VERSION
    assert {"sglang/srt/entrypoints/http_server.py", "sglang/srt/managers/io_struct.py"} <= set(
        FIXTURE["sources"])


def test_generate_payload_fits_both_schemas():
    payload = P.generate_payload([1, 2, 3], SAMPLING, request_id="r-1")
    check_request("/generate", payload)
    check_object(payload, FIXTURE["api_v1"]["GenerateRequest"], "api_v1.GenerateRequest")
    # api/v1 SamplingParams rejects unknown keys: the strictest check of the sampling object
    assert FIXTURE["api_v1"]["SamplingParams"]["unknown_keys"] == "rejected"
    check_object(payload["sampling_params"], FIXTURE["api_v1"]["SamplingParams"], "SamplingParams")


@pytest.mark.parametrize("endpoint,payload", [
    ("/init_weights_update_group", P.init_weights_update_group_payload(
        master_address="10.0.0.1", master_port=29600, rank_offset=1, world_size=5, backend="nccl")),
    ("/update_weights_from_distributed", P.update_weights_from_distributed_payload(
        names=["a.weight", "b.bias"], dtypes=["bfloat16", "float32"], shapes=[[2, 3], [3]],
        flattened=True)),
    ("/update_weights_from_distributed", P.update_weights_from_distributed_payload(
        names=["a.weight"], dtypes=["bfloat16"], shapes=[[2, 3]], flattened=False, flush_cache=True)),
    ("/destroy_weights_update_group", P.destroy_weights_update_group_payload()),
    ("/get_weights_by_name", P.get_weights_by_name_payload("model.norm.weight", 2)),
    ("/pause_generation", P.pause_generation_payload("retract")),
    ("/continue_generation", P.continue_generation_payload()),
    ("/update_weight_version", P.update_weight_version_payload("7")),
    ("/release_memory_occupation", P.memory_occupation_payload()),
    ("/resume_memory_occupation", P.memory_occupation_payload(["weights"])),
    ("/update_weights_from_tensor", P.update_weights_from_tensor_payload(["AAEC", "AwQF"])),
    ("/begin_weight_update", {}),
    ("/end_weight_update", {}),
    ("/abort_request", {"abort_all": True}),
])
def test_control_payloads_fit(endpoint, payload):
    check_request(endpoint, payload)


def test_the_checker_catches_mistakes():
    good = P.update_weights_from_distributed_payload(names=["a"], dtypes=["float32"], shapes=[[1]],
                                                     flattened=True)
    for broken in ({**good, "name": "a"}, {k: v for k, v in good.items() if k != "shapes"},
                   {**good, "shapes": [["1"]]}, {**good, "load_format": 3}):
        with pytest.raises(AssertionError):
            check_request("/update_weights_from_distributed", broken)
    with pytest.raises(AssertionError):
        check_object({"temperature": 1.0, "frequency": 2}, FIXTURE["api_v1"]["SamplingParams"], "s")


def test_endpoints_and_methods_megarl_uses_exist():
    routes = FIXTURE["routes"]
    for endpoint in ("/health", "/server_info", "/model_info"):
        assert "GET" in routes[endpoint]["methods"]
    for endpoint in ("/flush_cache", "/get_weights_by_name"):
        assert "POST" in routes[endpoint]["methods"]


def test_reply_fields_of_the_dev_server_are_sglangs():
    reply = {"text": "ab", "output_ids": [5, 6], "meta_info": {
        "id": "r", "finish_reason": {"type": "length", "length": 2}, "prompt_tokens": 3,
        "completion_tokens": 2, "cached_tokens": 0, "weight_version": "default",
        "e2e_latency": 0.1, "output_token_logprobs": [[-1.0, 5, None], [-2.0, 6, None]]}}
    check_object({k: v for k, v in reply.items() if k != "meta_info"},
                 FIXTURE["api_v1"]["GenerateResponse"], "GenerateResponse")
    check_object(reply["meta_info"], FIXTURE["api_v1"]["GenerateMetaInfo"], "GenerateMetaInfo")
    keys = FIXTURE["finish_reason_keys"]
    assert set(reply["meta_info"]["finish_reason"]) == set(keys["FINISH_LENGTH"])
    parsed = P.parse_generate_reply(reply)
    assert parsed.token_ids == [5, 6] and parsed.logprobs == [-1.0, -2.0]
    assert parsed.finish_reason == "length" and parsed.truncated


@pytest.mark.parametrize("mutate,field", [
    (lambda r: r.pop("output_ids"), "output_ids"),
    (lambda r: r["meta_info"].pop("finish_reason"), "meta_info.finish_reason"),
    (lambda r: r["meta_info"]["finish_reason"].update(type="done"), "meta_info.finish_reason.type"),
    (lambda r: r["meta_info"].pop("output_token_logprobs"), "meta_info.output_token_logprobs"),
    (lambda r: r["meta_info"]["output_token_logprobs"].pop(), "meta_info.output_token_logprobs"),
    (lambda r: r["meta_info"]["output_token_logprobs"][1].__setitem__(1, 9),
     "meta_info.output_token_logprobs[1][1]"),
    (lambda r: r["meta_info"]["output_token_logprobs"][0].__setitem__(0, "x"),
     "meta_info.output_token_logprobs[0][0]"),
    (lambda r: r["output_ids"].__setitem__(0, 1.5), "output_ids[0]"),
])
def test_malformed_replies_name_the_field(mutate, field):
    reply = {"output_ids": [5, 6], "meta_info": {
        "finish_reason": {"type": "stop", "matched": 6},
        "output_token_logprobs": [[-1.0, 5, None], [-2.0, 6, None]]}}
    mutate(reply)
    with pytest.raises(P.ServerReplyError) as info:
        P.parse_generate_reply(reply)
    assert info.value.field_name == field


def test_success_replies():
    assert P.parse_success_reply({"success": True, "message": "ok"}, "/x") == "ok"
    with pytest.raises(P.ServerReplyError, match="false: no group"):
        P.parse_success_reply({"success": False, "message": "no group"}, "/x")
    with pytest.raises(P.ServerReplyError, match="'success': missing"):
        P.parse_success_reply({"message": "?"}, "/x")


def test_launch_flags_are_sglangs_and_the_routers():
    cmd = sglang_server_command(model_path="/m", host="0.0.0.0", port=30000, tp_size=2,
                                mem_fraction_static=0.7, base_gpu_id=2, enable_memory_saver=True,
                                extra={"random_seed": 1, "skip_server_warmup": True})
    known = set(FIXTURE["launch_server_flags"].values())
    flags = [a for a in cmd if a.startswith("--")]
    assert set(flags) <= known, set(flags) - known
    assert cmd[cmd.index("--tp-size") + 1] == "2" and "--enable-memory-saver" in cmd

    from sglang_router.launch_router import parse_router_args

    args = parse_router_args(router_command(worker_urls=["http://a:1", "http://b:2"],
                                            host="10.1.2.3", port=9, policy="round_robin",
                                            request_timeout_s=60)[3:])
    assert args.worker_urls == ["http://a:1", "http://b:2"] and args.policy == "round_robin"
    assert args.request_timeout_secs == 60 and args.host == "10.1.2.3"
    assert args.prometheus_port not in (None, 29000)  # two routers on one host must not clash
