"""megarl's CPU development server: the HTTP subset of SGLang that megarl uses, on CPU.

    python -m megarl.rollout.dev_server --model-path DIR --port 30000

FOR DEVELOPMENT, TESTS AND THE CPU DEMO ONLY. It is not SGLang and not fast: it runs a Hugging
Face transformers model on CPU, gathers concurrent requests into batches (see `dev_engine`),
and receives new weights by torch.distributed broadcast over gloo exactly as SGLang's
update_weights_from_distributed does (see `dev_weights`). It says so in its start-up log and in
/server_info.

Endpoints (request and reply fields as in SGLang, see `megarl.rollout.protocol`): /health,
/health_generate, /generate, /flush_cache, /model_info, /server_info (and their /get_ aliases),
/init_weights_update_group, /destroy_weights_update_group, /begin_weight_update,
/update_weights_from_distributed, /end_weight_update, /update_weight_version,
/get_weights_by_name, /pause_generation, /continue_generation, /abort_request, plus the dev-only
/dev/weights_checksum (SHA-256 of every parameter's bytes, for bitwise verification).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import logging
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from aiohttp import web

from .dev_engine import DevEngine, EngineRequest, RequestError, parse_sampling
from .dev_weights import WeightReceiver, WeightUpdateError
from .protocol import SGLANG_VERSION, WEIGHT_UPDATE_GROUP

logger = logging.getLogger("megarl.dev_server")

DEV_NOTICE = ("megarl dev server: for development, tests and the CPU demo only (transformers on "
              "CPU, SGLang's HTTP protocol subset); use SGLang for real training")
_REQUIRED = object()


class BadRequest(ValueError):
    """A request body that does not fit the endpoint: answered with 400 naming the field."""


def _fields(body: Any, endpoint: str, spec: dict[str, tuple[tuple[type, ...], Any]]) -> dict:
    """Check `body` against {name: (types, default)}; unknown keys are ignored, as in SGLang."""
    if not isinstance(body, dict):
        raise BadRequest(f"{endpoint}: expected a JSON object, got {type(body).__name__}")
    out = {}
    for name, (types, default) in spec.items():
        if name not in body or body[name] is None and default is not _REQUIRED:
            if default is _REQUIRED:
                raise BadRequest(f"{endpoint}: field {name!r} is required")
            out[name] = default
            continue
        value = body[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise BadRequest(f"{endpoint}: field {name!r} must be "
                             f"{' or '.join(t.__name__ for t in types)}, got {value!r:.80}")
        out[name] = value
    return out


class DevServer:
    """The aiohttp application around one `DevEngine` and its `WeightReceiver`."""

    def __init__(self, engine: DevEngine, receiver: WeightReceiver, *, model_path: str,
                 dtype: str, group_timeout_s: float = 600.0) -> None:
        self.engine = engine
        self.receiver = receiver
        self.model_path = model_path
        self.dtype = dtype
        self.group_timeout_s = group_timeout_s
        # weight operations run one at a time off the event loop, like SGLang's scheduler
        self._weights_pool = concurrent.futures.ThreadPoolExecutor(1, "dev-weights")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        r = app.router
        for path in ("/health", "/health_generate"):
            r.add_get(path, self.health)
        r.add_route("POST", "/generate", self.generate)
        r.add_route("PUT", "/generate", self.generate)
        either: dict[str, Callable] = {"/flush_cache": self.flush_cache,
                                       "/get_weights_by_name": self.weights_by_name,
                                       "/dev/weights_checksum": self.weights_checksum}
        for path, handler in either.items():  # GET or POST, as in SGLang
            r.add_get(path, handler, allow_head=False)
            r.add_post(path, handler)
        for path in ("/model_info", "/get_model_info"):
            r.add_get(path, self.model_info)
        for path in ("/server_info", "/get_server_info"):
            r.add_get(path, self.server_info)
        posts: dict[str, Callable] = {
            "/init_weights_update_group": self.init_group,
            "/destroy_weights_update_group": self.destroy_group,
            "/begin_weight_update": self.begin_update,
            "/end_weight_update": self.end_update,
            "/update_weights_from_distributed": self.update_from_distributed,
            "/update_weight_version": self.update_weight_version,
            "/pause_generation": self.pause,
            "/continue_generation": self.resume,
            "/abort_request": self.abort,
        }
        for path, handler in posts.items():
            r.add_post(path, handler)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _cleanup(self, _app: web.Application) -> None:
        self.engine.stop()
        self._weights_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ generation

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.engine.alive() else 503)

    async def generate(self, request: web.Request) -> web.Response:
        try:
            body = _fields(await _json(request), "/generate", {
                "input_ids": ((list,), None), "text": ((str,), None),
                "sampling_params": ((dict,), None), "return_logprob": ((bool,), False),
                "rid": ((str,), None), "stream": ((bool,), False),
            })
            input_ids = self._prompt_ids(body)
            sampling = parse_sampling(body["sampling_params"])
            self.engine.check(input_ids, sampling)
        except (BadRequest, RequestError) as exc:
            return _error(400, str(exc))
        loop = asyncio.get_running_loop()
        req = EngineRequest(rid=body["rid"] or uuid.uuid4().hex, input_ids=input_ids,
                            sampling=sampling, return_logprob=body["return_logprob"],
                            future=loop.create_future(), loop=loop)
        self.engine.submit(req)
        try:
            reply = await req.future
        except asyncio.CancelledError:
            req.aborted, req.abort_message = True, "client disconnected"
            raise
        except Exception as exc:  # noqa: BLE001 - a failed forward is the server's error
            logger.exception("generation failed")
            return _error(500, f"generation failed: {exc!r}")
        return web.json_response(reply)

    def _prompt_ids(self, body: dict) -> list[int]:
        if body["stream"]:
            raise BadRequest("/generate: stream=true is not supported by the dev server")
        ids = body["input_ids"]
        if ids is None and body["text"] is not None:
            if self.engine.tokenizer is None:
                raise BadRequest("/generate: text needs a tokenizer; send input_ids")
            return list(self.engine.tokenizer(body["text"])["input_ids"])
        if ids is None:
            raise BadRequest("/generate: one of input_ids or text is required")
        if ids and isinstance(ids[0], list):
            raise BadRequest("/generate: batched input_ids are not supported by the dev server; "
                             "send one prompt per request")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise BadRequest("/generate: field 'input_ids' must be a list of ints")
        return ids

    async def flush_cache(self, request: web.Request) -> web.Response:
        # no prefix cache to flush: the answer says so, as SGLang's does for its own
        return web.Response(text="Cache flushed (the dev server keeps no prefix cache).\n")

    async def pause(self, request: web.Request) -> web.Response:
        try:
            body = _fields(await _json(request), "/pause_generation", {"mode": ((str,), "abort")})
        except BadRequest as exc:
            return _error(400, str(exc))
        if body["mode"] not in ("abort", "retract", "in_place"):
            return _error(400, f"/pause_generation: mode {body['mode']!r} is not one of "
                               "abort, retract, in_place")
        self.engine.pause(body["mode"])
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def resume(self, request: web.Request) -> web.Response:
        self.engine.resume()
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    async def abort(self, request: web.Request) -> web.Response:
        try:
            body = _fields(await _json(request), "/abort_request",
                           {"rid": ((str,), ""), "abort_all": ((bool,), False)})
        except BadRequest as exc:
            return _error(400, str(exc))
        if not body["abort_all"]:
            return _error(400, "/abort_request: the dev server only supports abort_all=true")
        self.engine.abort_all("aborted by /abort_request")
        return web.Response(status=200)

    # ------------------------------------------------------------------ information

    async def model_info(self, request: web.Request) -> web.Response:
        config = self.engine.model.config
        return web.json_response({
            "model_path": self.model_path, "tokenizer_path": self.model_path,
            "is_generation": True, "weight_version": self.engine.weight_version,
            "model_type": getattr(config, "model_type", None),
            "architectures": getattr(config, "architectures", None),
        })

    async def server_info(self, request: web.Request) -> web.Response:
        return web.json_response({
            "backend": "megarl-dev-server", "note": DEV_NOTICE,
            "sglang_protocol_version": SGLANG_VERSION, "model_path": self.model_path,
            "tp_size": 1, "dtype": self.dtype, "max_batch_size": self.engine.max_batch_size,
            "weight_version": self.engine.weight_version, "paused": self.engine.paused,
            "num_requests_finished": self.engine.num_finished,
            "num_requests_running": self.engine.load(),
        })

    # ------------------------------------------------------------------ weights

    async def _weights_call(self, endpoint: str, fn: Callable[[], str]) -> web.Response:
        loop = asyncio.get_running_loop()
        try:
            message = await loop.run_in_executor(self._weights_pool, fn)
        except (WeightUpdateError, RuntimeError, ValueError) as exc:
            logger.error("%s failed: %s", endpoint, exc)
            return web.json_response({"success": False, "message": str(exc)}, status=400)
        return web.json_response({"success": True, "message": message})

    async def init_group(self, request: web.Request) -> web.Response:
        try:
            b = _fields(await _json(request), "/init_weights_update_group", {
                "master_address": ((str,), _REQUIRED), "master_port": ((int,), _REQUIRED),
                "rank_offset": ((int,), _REQUIRED), "world_size": ((int,), _REQUIRED),
                "group_name": ((str,), WEIGHT_UPDATE_GROUP), "backend": ((str,), "nccl"),
            })
        except BadRequest as exc:
            return _error(400, str(exc))
        return await self._weights_call(
            "/init_weights_update_group", lambda: self.receiver.init_group(
                master_address=b["master_address"], master_port=b["master_port"],
                rank_offset=b["rank_offset"], world_size=b["world_size"],
                group_name=b["group_name"], backend=b["backend"], timeout_s=self.group_timeout_s))

    async def destroy_group(self, request: web.Request) -> web.Response:
        try:
            b = _fields(await _json(request), "/destroy_weights_update_group",
                        {"group_name": ((str,), WEIGHT_UPDATE_GROUP)})
        except BadRequest as exc:
            return _error(400, str(exc))
        return await self._weights_call("/destroy_weights_update_group",
                                        lambda: self.receiver.destroy_group(b["group_name"]))

    async def begin_update(self, request: web.Request) -> web.Response:
        return await self._weights_call("/begin_weight_update", self.receiver.begin)

    async def end_update(self, request: web.Request) -> web.Response:
        return await self._weights_call("/end_weight_update", self.receiver.end)

    async def update_from_distributed(self, request: web.Request) -> web.Response:
        try:
            b = _fields(await _json(request), "/update_weights_from_distributed", {
                "names": ((list,), _REQUIRED), "dtypes": ((list,), _REQUIRED),
                "shapes": ((list,), _REQUIRED), "group_name": ((str,), WEIGHT_UPDATE_GROUP),
                "load_format": ((str,), None), "weight_version": ((str,), None),
            })
        except BadRequest as exc:
            return _error(400, str(exc))

        def run() -> str:
            message = self.receiver.update_from_distributed(
                names=b["names"], dtypes=b["dtypes"], shapes=b["shapes"],
                group_name=b["group_name"], load_format=b["load_format"])
            if b["weight_version"] is not None:
                self.engine.weight_version = b["weight_version"]
            return message

        return await self._weights_call("/update_weights_from_distributed", run)

    async def update_weight_version(self, request: web.Request) -> web.Response:
        try:
            b = _fields(await _json(request), "/update_weight_version",
                        {"new_version": ((str,), _REQUIRED), "abort_all_requests": ((bool,), True)})
        except BadRequest as exc:
            return _error(400, str(exc))
        if b["abort_all_requests"]:
            self.engine.abort_all("weight version changed")
        self.engine.weight_version = b["new_version"]
        return web.json_response({"success": True, "new_version": b["new_version"],
                                  "message": f"Weight version updated to {b['new_version']}"})

    async def weights_by_name(self, request: web.Request) -> web.Response:
        try:
            b = _fields(await _json(request), "/get_weights_by_name",
                        {"name": ((str,), _REQUIRED), "truncate_size": ((int,), 100)})
            return web.json_response(self.receiver.weights_by_name(b["name"], b["truncate_size"]))
        except (BadRequest, WeightUpdateError) as exc:
            return _error(400, str(exc))

    async def weights_checksum(self, request: web.Request) -> web.Response:
        try:
            b = _fields(await _json(request, allow_empty=True), "/dev/weights_checksum",
                        {"names": ((list,), None)})
        except BadRequest as exc:
            return _error(400, str(exc))
        loop = asyncio.get_running_loop()
        try:
            sums = await loop.run_in_executor(self._weights_pool,
                                              lambda: self.receiver.checksums(b["names"]))
        except WeightUpdateError as exc:
            return _error(400, str(exc))
        return web.json_response({"checksums": sums, "weight_version": self.engine.weight_version})


async def _json(request: web.Request, allow_empty: bool = True) -> Any:
    raw = await request.read()
    if not raw.strip():
        return {} if allow_empty else None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"{request.path}: body is not valid JSON: {exc}") from None


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "code": status}}, status=status)


class _DropHttp2Probes(logging.Filter):
    """sglang-router probes workers with an HTTP/2 preface first; aiohttp logs each as an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and "PRI/Upgrade" in str(exc))


def build_server(args: argparse.Namespace) -> DevServer:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.random_seed)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    except (OSError, ValueError):
        tokenizer = None
        logger.warning("no tokenizer in %s: stop strings and text prompts are unavailable",
                       args.model_path)
    eos = model.generation_config.eos_token_id if model.generation_config else None
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    engine = DevEngine(model, eos_token_ids=eos_ids, tokenizer=tokenizer,
                       max_batch_size=args.max_batch_size, seed=args.random_seed)
    return DevServer(engine, WeightReceiver(model, engine), model_path=args.model_path,
                     dtype=args.dtype, group_timeout_s=args.weight_group_timeout_s)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m megarl.rollout.dev_server", description=DEV_NOTICE)
    p.add_argument("--model-path", required=True, help="a Hugging Face model directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--num-threads", type=int, default=0, help="torch CPU threads; 0: default")
    p.add_argument("--weight-group-timeout-s", type=float, default=600.0)
    p.add_argument("--tp-size", type=int, default=1, choices=(1,),
                   help="accepted for parity with SGLang's flags; the dev server is one rank")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if not (Path(args.model_path) / "config.json").is_file():
        # before the slow imports: a wrong path should fail the run's start-up at once
        sys.exit(f"megarl dev server: --model-path {args.model_path} is not a Hugging Face "
                 "model directory (no config.json)")
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.server").addFilter(_DropHttp2Probes())
    logger.warning(DEV_NOTICE)
    server = build_server(args)
    logger.info("serving %s on http://%s:%d", args.model_path, args.host, args.port)
    # handler_cancellation: a client that disconnects cancels its handler, which aborts the
    # request in the engine (SGLang aborts requests of disconnected clients too)
    web.run_app(server.app(), host=args.host, port=args.port, print=None, access_log=None,
                handle_signals=True, handler_cancellation=True)


if __name__ == "__main__":
    main()
