"""The generation engine of the CPU development server: a transformers model, a KV cache, and
concurrent requests gathered into batches.

For development, tests and the CPU demo only. One worker thread runs the model: it takes up to
`max_batch_size` queued requests, left-pads their prompts, prefills them together and decodes
with a shared `DynamicCache` until every request of the batch has finished. Requests that
arrive meanwhile wait for the next batch (gathering, not continuous batching).

Sampling follows SGLang: the returned log-prob of a sampled token is
log_softmax(logits / temperature), taken before top-k/top-p truncation; temperature 0 is greedy
and its log-probs are log_softmax(logits).

Pausing follows SGLang's pause_generation modes. `abort`: running and queued requests end with
finish_reason abort; `retract` and `in_place`: running requests stop between decode steps and
continue after `resume()` (this engine keeps their KV cache in both cases). A weight update
(`exclusive()`) waits until no batch is decoding, so without a pause it waits for in-flight
requests to finish, as SGLang's model-update lock does.

Legend: B batch rows, L padded length, V vocabulary.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from .protocol import SamplingParams as Sampling

SUPPORTED_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens", "stop",
                           "stop_token_ids", "ignore_eos", "sampling_seed")
_GATHER_S = 0.005  # how long the worker waits for more requests once one has arrived


class RequestError(ValueError):
    """A /generate request the engine cannot serve; the server answers 400 with this text."""


def parse_sampling(params: Any) -> Sampling:
    """SGLang's sampling_params object, restricted to what the engine implements."""
    if params is None:
        return Sampling()
    if not isinstance(params, dict):
        raise RequestError(f"sampling_params: expected an object, got {type(params).__name__}")
    unknown = sorted(set(params) - set(SUPPORTED_SAMPLING_KEYS))
    if unknown:
        raise RequestError(f"sampling_params: {', '.join(unknown)} not supported by the dev "
                           f"server (supported: {', '.join(SUPPORTED_SAMPLING_KEYS)})")
    given = {k: v for k, v in params.items() if v is not None}
    stop = given.get("stop", ())
    try:
        s = Sampling(
            temperature=float(given.get("temperature", 1.0)),
            top_p=float(given.get("top_p", 1.0)), top_k=int(given.get("top_k", -1)),
            max_new_tokens=int(given.get("max_new_tokens", 128)),
            stop=(stop,) if isinstance(stop, str) else tuple(str(x) for x in stop),
            stop_token_ids=tuple(int(t) for t in given.get("stop_token_ids", ())),
            ignore_eos=bool(given.get("ignore_eos", False)),
            seed=int(given["sampling_seed"]) if "sampling_seed" in given else None)
    except (TypeError, ValueError) as exc:
        raise RequestError(f"sampling_params: {exc}") from None
    if s.temperature < 0 or not 0 < s.top_p <= 1 or s.max_new_tokens < 0:
        raise RequestError("sampling_params: need temperature >= 0, 0 < top_p <= 1 and "
                           f"max_new_tokens >= 0, got {params}")
    if s.top_k != -1 and s.top_k < 1:
        raise RequestError(f"sampling_params.top_k: must be -1 (disable) or >= 1, got {s.top_k}")
    return s


@dataclass(kw_only=True)
class EngineRequest:
    """One queued /generate request; `future` resolves to the SGLang-shaped reply dict."""

    rid: str
    input_ids: list[int]
    sampling: Sampling
    return_logprob: bool
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    created: float = field(default_factory=time.monotonic)
    aborted: bool = False
    abort_message: str = ""
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: Optional[dict[str, Any]] = None


class DevEngine:
    """Batched generation on CPU with a transformers causal LM (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, *, eos_token_ids: tuple[int, ...],
                 tokenizer: Any = None, max_batch_size: int = 32, seed: int = 0) -> None:
        self.model = model.eval()
        self.eos_token_ids = tuple(eos_token_ids)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_context = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        self.vocab_size = int(model.config.vocab_size)
        self.weight_version = "default"
        self.num_finished = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._queue: "queue.Queue[EngineRequest]" = queue.Queue()
        self._running: list[EngineRequest] = []
        self._cond = threading.Condition()
        self._paused = False
        self._updating = False
        self._busy = False
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="dev-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- requests and control

    def check(self, input_ids: list[int], sampling: Sampling) -> None:
        """Reject a request the model cannot serve (400) before it is queued."""
        if not input_ids:
            raise RequestError("input_ids: empty prompt")
        bad = [t for t in input_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"input_ids: token ids {bad[:5]} outside the vocabulary "
                               f"[0, {self.vocab_size})")
        if len(input_ids) + sampling.max_new_tokens > self.max_context:
            raise RequestError(f"prompt ({len(input_ids)} tokens) + max_new_tokens "
                               f"({sampling.max_new_tokens}) exceed the model's context "
                               f"length {self.max_context}")

    def submit(self, request: EngineRequest) -> None:
        self._queue.put(request)

    def pause(self, mode: str) -> None:
        with self._cond:
            self._paused = True
            if mode == "abort":
                self._abort_all_locked("paused for a weight update")
            self._cond.notify_all()

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    def abort_all(self, message: str = "aborted") -> None:
        with self._cond:
            self._abort_all_locked(message)

    def _abort_all_locked(self, message: str) -> None:
        for req in self._running:
            req.aborted, req.abort_message = True, message
        while True:
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                break
            req.aborted, req.abort_message = True, message
            self._finish(req, {"type": "abort", "message": message, "status_code": None,
                               "err_type": None})

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the model alone: waits until no batch is decoding and blocks new steps."""
        with self._cond:
            self._cond.wait_for(lambda: not self._busy and not self._updating)
            self._updating = True
        try:
            yield
        finally:
            with self._cond:
                self._updating = False
                self._cond.notify_all()

    def alive(self) -> bool:
        """Whether the worker thread runs (it stops only with `stop`)."""
        return self._thread.is_alive()

    def load(self) -> int:
        """Requests queued or running."""
        return len(self._running) + self._queue.qsize()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    # ---------------------------------------------------------------- the worker thread

    def _loop(self) -> None:
        while not self._stopped:
            with self._cond:
                self._cond.wait_for(lambda: self._stopped or not (self._paused or self._updating),
                                    timeout=0.5)
                if self._stopped or self._paused or self._updating:
                    continue
            batch = self._take_batch()
            if not batch:
                continue
            with self._cond:
                self._running = batch
                self._busy = True
            try:
                self._generate(batch)
            except Exception as exc:  # noqa: BLE001 - a model failure ends its requests, not the server
                for req in batch:
                    if req.finish is None:
                        self._fail(req, exc)
            finally:
                with self._cond:
                    self._running = []
                    self._busy = False
                    self._cond.notify_all()

    def _take_batch(self) -> list[EngineRequest]:
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + _GATHER_S
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        live = []
        for req in batch:
            if req.aborted:
                self._finish(req, {"type": "abort", "message": req.abort_message or "aborted",
                                   "status_code": None, "err_type": None})
            else:
                live.append(req)
        return live

    def _park_while_paused(self) -> None:
        """Between decode steps: let a pause (and the weight update it allows) go first."""
        with self._cond:
            if not (self._paused or self._updating):
                return
            self._busy = False
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._stopped or not (self._paused or self._updating))
            self._busy = True

    @torch.no_grad()
    def _generate(self, batch: list[EngineRequest]) -> None:
        from transformers import DynamicCache

        num_rows = len(batch)
        length = max(len(r.input_ids) for r in batch)
        ids_BL = torch.zeros(num_rows, length, dtype=torch.long)
        mask_BL = torch.zeros(num_rows, length, dtype=torch.long)
        for i, req in enumerate(batch):
            ids_BL[i, length - len(req.input_ids):] = torch.tensor(req.input_ids)
            mask_BL[i, length - len(req.input_ids):] = 1
        positions_BL = (mask_BL.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        generators = [self._row_generator(r.sampling) for r in batch]
        for req in batch:
            if req.sampling.max_new_tokens == 0:
                self._finish(req, {"type": "length", "length": 0})
        out = self.model(input_ids=ids_BL, attention_mask=mask_BL, position_ids=positions_BL,
                         past_key_values=cache, use_cache=True)
        while self._finish_aborted(batch):
            self._park_while_paused()
            if not self._finish_aborted(batch):  # an abort-mode pause ended them all
                break
            next_B = torch.zeros(num_rows, dtype=torch.long)
            logits_BV = out.logits[:, -1, :self.vocab_size].float()
            for i, req in enumerate(batch):
                if req.finish is not None:
                    continue
                token, logprob = sample_token(logits_BV[i], req.sampling, generators[i])
                next_B[i] = token
                req.output_ids.append(token)
                req.logprobs.append(logprob)
                self._check_stop(req)
            if all(r.finish is not None for r in batch):
                break
            mask_BL = torch.cat([mask_BL, torch.ones(num_rows, 1, dtype=torch.long)], dim=1)
            positions_BL = positions_BL[:, -1:] + 1
            out = self.model(input_ids=next_B[:, None], attention_mask=mask_BL,
                             position_ids=positions_BL, past_key_values=cache, use_cache=True)

    def _finish_aborted(self, batch: list[EngineRequest]) -> bool:
        """End aborted requests; whether any request of the batch is still running."""
        for req in batch:
            if req.finish is None and req.aborted:
                self._finish(req, {"type": "abort", "message": req.abort_message or "aborted",
                                   "status_code": None, "err_type": None})
        return any(req.finish is None for req in batch)

    def _row_generator(self, sampling: Sampling) -> torch.Generator:
        if sampling.seed is not None:
            return torch.Generator().manual_seed(sampling.seed)
        seed = int(torch.randint(0, 2**62, (1,), generator=self._generator))
        return torch.Generator().manual_seed(seed)

    def _check_stop(self, req: EngineRequest) -> None:
        token, s = req.output_ids[-1], req.sampling
        if (not s.ignore_eos and token in self.eos_token_ids) or token in s.stop_token_ids:
            self._finish(req, {"type": "stop", "matched": token})
            return
        if s.stop and self.tokenizer is not None:
            tail = self.tokenizer.decode(req.output_ids[-32:], skip_special_tokens=True)
            for stop in s.stop:
                if stop in tail:
                    self._finish(req, {"type": "stop", "matched": stop})
                    return
        if len(req.output_ids) >= s.max_new_tokens:
            self._finish(req, {"type": "length", "length": s.max_new_tokens})

    # ---------------------------------------------------------------- replies

    def _finish(self, req: EngineRequest, finish: dict[str, Any]) -> None:
        req.finish = finish
        self.num_finished += 1
        reply = self._reply(req)
        req.loop.call_soon_threadsafe(_resolve, req.future, reply, None)

    def _fail(self, req: EngineRequest, exc: Exception) -> None:
        req.finish = {"type": "abort", "message": f"engine error: {exc!r}"}
        req.loop.call_soon_threadsafe(_resolve, req.future, None, exc)

    def _reply(self, req: EngineRequest) -> dict[str, Any]:
        text = ""
        if self.tokenizer is not None and req.output_ids:
            text = self.tokenizer.decode(req.output_ids, skip_special_tokens=True)
        meta: dict[str, Any] = {
            "id": req.rid,
            "finish_reason": req.finish,
            "prompt_tokens": len(req.input_ids),
            "completion_tokens": len(req.output_ids),
            "cached_tokens": 0,
            "weight_version": self.weight_version,
            "e2e_latency": time.monotonic() - req.created,
        }
        if req.return_logprob:
            meta["output_token_logprobs"] = [[lp, tok, None]
                                             for lp, tok in zip(req.logprobs, req.output_ids)]
        return {"text": text, "output_ids": list(req.output_ids), "meta_info": meta}


def _resolve(future: asyncio.Future, result: Any, exc: Optional[BaseException]) -> None:
    if future.done():  # the client went away and the handler was cancelled
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def sample_token(logits_V: torch.Tensor, sampling: Sampling,
                 generator: torch.Generator) -> tuple[int, float]:
    """One token and its log-prob, with SGLang's conventions (see the module docstring)."""
    if sampling.temperature == 0 or sampling.top_k == 1:
        logprobs_V = torch.log_softmax(logits_V, dim=-1)
        token = int(torch.argmax(logits_V))
        return token, float(logprobs_V[token])
    scaled_V = logits_V / sampling.temperature
    logprobs_V = torch.log_softmax(scaled_V, dim=-1)
    probs_V = logprobs_V.exp()
    if sampling.top_k > 0 and sampling.top_k < probs_V.numel():
        kth = torch.topk(probs_V, sampling.top_k).values[-1]
        probs_V = torch.where(probs_V >= kth, probs_V, torch.zeros_like(probs_V))
    if sampling.top_p < 1.0:
        sorted_V, order_V = torch.sort(probs_V, descending=True)
        # drop a token when the mass before it already reaches top_p (it keeps at least one)
        drop_V = (sorted_V.cumsum(0) - sorted_V) > sampling.top_p * sorted_V.sum()
        sorted_V = sorted_V.masked_fill(drop_V, 0.0)
        probs_V = torch.zeros_like(probs_V).scatter(0, order_V, sorted_V)
    token = int(torch.multinomial(probs_V, 1, generator=generator))
    return token, float(logprobs_V[token])
