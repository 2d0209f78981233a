"""The subset of SGLang's HTTP protocol megarl speaks, pinned to one SGLang version.

Every request megarl sends to a generation server is built here, and every reply it reads is
checked here, so that a change of SGLang's protocol shows up in one file and in one test
(`tests/unit/test_rollout_protocol.py`, which checks these payloads against the fields recorded
from SGLang's source in `tests/fixtures/sglang_protocol.json`).

Weight updates of the pinned version run inside a session:
pause_generation -> begin_weight_update -> update_weights_from_distributed (one per bucket,
each concurrent with its broadcast) -> end_weight_update -> flush_cache ->
update_weight_version -> continue_generation. An update sent outside a session is refused by
the server before it joins the broadcast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

SGLANG_VERSION = "0.5.23"
"""The SGLang release whose protocol this module follows (`pip install sglang==0.5.23`)."""

WEIGHT_UPDATE_GROUP = "weight_update_group"
"""SGLang's default name of the trainer-to-server weight-update process group."""

FINISH_REASONS = ("stop", "length", "abort")


class ServerReplyError(RuntimeError):
    """A server answered, but not as the protocol says: names the endpoint and the field."""

    def __init__(self, endpoint: str, field_name: str, message: str) -> None:
        super().__init__(f"{endpoint}: reply field {field_name!r}: {message}")
        self.endpoint = endpoint
        self.field_name = field_name


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one response is sampled. Log-probs are returned at this temperature (SGLang returns
    log_softmax(logits / temperature) of the sampled token, before top-p/top-k truncation)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: Optional[int] = None
    """Per-request sampling seed (SGLang's sampling_seed); None lets the server choose."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token (until a stop or max_new_tokens)."""

    @classmethod
    def from_config(cls, rollout: Any) -> "SamplingParams":
        """The rollout sampling of a `RolloutConfig`."""
        return cls(temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
                   max_new_tokens=rollout.max_new_tokens, stop=tuple(rollout.stop))

    def to_payload(self) -> dict[str, Any]:
        """SGLang's `sampling_params` object (api/v1 SamplingParams; unknown keys are refused)."""
        params: dict[str, Any] = {
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            "top_k": int(self.top_k),
            "max_new_tokens": int(self.max_new_tokens),
        }
        if self.stop:
            params["stop"] = list(self.stop)
        if self.stop_token_ids:
            params["stop_token_ids"] = [int(t) for t in self.stop_token_ids]
        if self.seed is not None:
            params["sampling_seed"] = int(self.seed)
        if self.ignore_eos:
            params["ignore_eos"] = True
        return params


@dataclass(kw_only=True)
class Response:
    """One generated response, as the trainer needs it."""

    token_ids: list[int]
    """Generated token ids (the prompt excluded)."""
    logprobs: list[float]
    """Log-prob of each generated token under the rollout policy at the sampling temperature."""
    finish_reason: str
    """stop (EOS, stop token or stop string), length (max_new_tokens) or abort."""
    text: str = ""
    prompt_tokens: int = 0
    weight_version: Optional[str] = None
    """The server's weight version when the response finished."""
    request_id: str = ""
    num_attempts: int = 1
    """Attempts it took (more than 1 after retries on connection errors or failed servers)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def truncated(self) -> bool:
        """Whether the response was cut at max_new_tokens."""
        return self.finish_reason == "length"


# --------------------------------------------------------------------------------------------
# Requests


def generate_payload(input_ids: Sequence[int], sampling: SamplingParams, *,
                     request_id: Optional[str] = None) -> dict[str, Any]:
    """A GenerateReqInput for one prompt given as token ids, with per-token log-probs."""
    payload: dict[str, Any] = {
        "input_ids": list(map(int, input_ids)),
        "sampling_params": sampling.to_payload(),
        "return_logprob": True,
        "stream": False,
    }
    if request_id is not None:
        payload["rid"] = request_id
    return payload


def init_weights_update_group_payload(*, master_address: str, master_port: int, rank_offset: int,
                                      world_size: int, backend: str,
                                      group_name: str = WEIGHT_UPDATE_GROUP) -> dict[str, Any]:
    """InitWeightsUpdateGroupReqInput: the server's TP ranks join as rank_offset + tp_rank."""
    return {"master_address": master_address, "master_port": int(master_port),
            "rank_offset": int(rank_offset), "world_size": int(world_size),
            "group_name": group_name, "backend": backend}


def update_weights_from_distributed_payload(
    *, names: Sequence[str], dtypes: Sequence[str], shapes: Sequence[Sequence[int]],
    flattened: bool, flush_cache: bool = False, group_name: str = WEIGHT_UPDATE_GROUP,
) -> dict[str, Any]:
    """UpdateWeightsFromDistributedReqInput announcing the tensors of one broadcast bucket.

    flattened=True: the bucket is one uint8 broadcast of the tensors' bytes back to back
    (load_format flattened_bucket); False: one broadcast per tensor, in order.
    """
    payload: dict[str, Any] = {
        "names": list(names), "dtypes": list(dtypes), "shapes": [list(s) for s in shapes],
        "group_name": group_name, "flush_cache": bool(flush_cache),
        "abort_all_requests": False,
    }
    if flattened:
        payload["load_format"] = "flattened_bucket"
    return payload


def destroy_weights_update_group_payload(group_name: str = WEIGHT_UPDATE_GROUP) -> dict[str, Any]:
    return {"group_name": group_name}


def get_weights_by_name_payload(name: str, truncate_size: int = 100) -> dict[str, Any]:
    """GetWeightsByNameReqInput: the reply is the first `truncate_size` rows as float32 lists."""
    return {"name": name, "truncate_size": int(truncate_size)}


def pause_generation_payload(mode: str) -> dict[str, Any]:
    return {"mode": mode}


def continue_generation_payload() -> dict[str, Any]:
    return {}


def update_weight_version_payload(version: str) -> dict[str, Any]:
    return {"new_version": str(version), "abort_all_requests": False}


def memory_occupation_payload(tags: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Release/ResumeMemoryOccupationReqInput; tags None means every region."""
    return {} if tags is None else {"tags": list(tags)}


def update_weights_from_tensor_payload(serialized_per_rank: Sequence[str], *,
                                       flush_cache: bool = False,
                                       load_format: Optional[str] = None) -> dict[str, Any]:
    """UpdateWeightsFromTensorReqInput: one base64 payload per server TP rank."""
    payload: dict[str, Any] = {"serialized_named_tensors": list(serialized_per_rank),
                               "flush_cache": bool(flush_cache), "abort_all_requests": False}
    if load_format is not None:
        payload["load_format"] = load_format
    return payload


# --------------------------------------------------------------------------------------------
# Replies


def _require(body: Any, key: str, types: tuple[type, ...], endpoint: str, path: str = "") -> Any:
    if not isinstance(body, dict):
        raise ServerReplyError(endpoint, path or "<body>",
                               f"expected a JSON object, got {type(body).__name__}")
    if key not in body:
        raise ServerReplyError(endpoint, path + key, "missing")
    value = body[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = " or ".join(t.__name__ for t in types)
        raise ServerReplyError(endpoint, path + key,
                               f"expected {names}, got {type(value).__name__} {value!r:.80}")
    return value


def parse_finish_reason(value: Any, endpoint: str = "/generate") -> str:
    """SGLang's finish_reason object ({"type": "stop"|"length"|"abort", ...}) as a word."""
    key = "meta_info.finish_reason"
    if value is None:
        raise ServerReplyError(endpoint, key, "is null: the request did not finish")
    kind = _require(value, "type", (str,), endpoint, key + ".")
    if kind not in FINISH_REASONS:
        raise ServerReplyError(endpoint, key + ".type",
                               f"{kind!r} is not one of {', '.join(FINISH_REASONS)}")
    return kind


def parse_generate_reply(body: Any, *, endpoint: str = "/generate") -> Response:
    """Check one non-streaming /generate reply and turn it into a `Response`.

    Requires output_ids, meta_info.finish_reason and, unless the request was aborted,
    meta_info.output_token_logprobs with one [logprob, token_id, text] entry per output token
    whose token id matches output_ids.
    """
    output_ids = _require(body, "output_ids", (list,), endpoint)
    meta = _require(body, "meta_info", (dict,), endpoint)
    if not all(type(token) is int for token in output_ids):
        i, token = next((i, t) for i, t in enumerate(output_ids) if type(t) is not int)
        raise ServerReplyError(endpoint, f"output_ids[{i}]", f"expected int, got {token!r}")
    finish_reason = parse_finish_reason(meta.get("finish_reason"), endpoint)
    logprobs = _parse_logprobs(meta, output_ids, endpoint, required=finish_reason != "abort")
    text = body.get("text") or ""
    version = meta.get("weight_version")
    return Response(
        token_ids=list(output_ids), logprobs=logprobs, finish_reason=finish_reason,
        text=text if isinstance(text, str) else "",
        prompt_tokens=int(meta.get("prompt_tokens") or 0),
        weight_version=None if version is None else str(version),
        request_id=str(meta.get("id", "")),
    )


def _parse_logprobs(meta: dict, output_ids: list[int], endpoint: str, *,
                    required: bool) -> list[float]:
    key = "meta_info.output_token_logprobs"
    entries = meta.get("output_token_logprobs")
    if entries is None:
        if required:
            raise ServerReplyError(endpoint, key, "missing (was return_logprob sent?)")
        return []
    if not isinstance(entries, list):
        raise ServerReplyError(endpoint, key, f"expected a list, got {type(entries).__name__}")
    if len(entries) != len(output_ids):
        raise ServerReplyError(endpoint, key, f"has {len(entries)} entries for "
                                              f"{len(output_ids)} output_ids")
    # fast path for well-formed replies (thousands per step); the slow path names the fault
    try:
        values = [v for v, _token, _text in entries]
        tokens = [token for _v, token, _text in entries]
    except (TypeError, ValueError):
        values, tokens = [], None
    if (tokens == output_ids and all(type(v) is float or type(v) is int for v in values)
            and not any(v != v for v in values)):  # v != v: NaN
        return [float(v) for v in values]
    for i, entry in enumerate(entries):
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise ServerReplyError(endpoint, f"{key}[{i}]",
                                   f"expected [logprob, token_id, text], got {entry!r:.80}")
        value, token = entry[0], entry[1]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            raise ServerReplyError(endpoint, f"{key}[{i}][0]", f"not a log-prob: {value!r}")
        if token != output_ids[i]:
            raise ServerReplyError(endpoint, f"{key}[{i}][1]",
                                   f"token id {token!r} differs from "
                                   f"output_ids[{i}]={output_ids[i]}")
    raise AssertionError("unreachable: the fast path rejected a valid reply")


def parse_success_reply(body: Any, endpoint: str) -> str:
    """Replies of the weight-update endpoints: {"success": bool, "message": str}.

    Returns the message; raises ServerReplyError when success is false.
    """
    success = _require(body, "success", (bool,), endpoint)
    message = body.get("message", "")
    if not success:
        raise ServerReplyError(endpoint, "success", f"false: {message}")
    return str(message)


def parse_weights_by_name_reply(body: Any, name: str) -> list:
    """/get_weights_by_name: a flat list of floats or a list of rows (first rows only)."""
    endpoint = f"/get_weights_by_name({name})"
    if not isinstance(body, list):
        raise ServerReplyError(endpoint, "<body>",
                               f"expected a list of rows, got {type(body).__name__} {body!r:.80}")
    return body


def parse_server_info(body: Any, endpoint: str = "/server_info") -> dict[str, Any]:
    """The fields megarl reads from /server_info: tp_size (and everything else untouched)."""
    tp_size = _require(body, "tp_size", (int,), endpoint)
    if tp_size < 1:
        raise ServerReplyError(endpoint, "tp_size", f"must be >= 1, got {tp_size}")
    return body


def dtype_name(dtype: Any) -> str:
    """The dtype string SGLang resolves with getattr(torch, name), e.g. 'bfloat16'."""
    return str(dtype).removeprefix("torch.")
