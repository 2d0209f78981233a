"""`rollout`: the generation servers, how they are reached, and how responses are sampled."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import ConfigError, check_choice, check_non_negative, check_positive, check_range


@dataclass(kw_only=True)
class RolloutConfig:
    backend: str = "sglang"
    """Generation servers: sglang (SGLang, GPU) or dev (megarl's CPU development server, which
    speaks the same HTTP protocol and exists for development, tests and the CPU demo only)."""

    mode: str = "disaggregated"
    """disaggregated: servers on their own GPUs or nodes; colocated: servers share the trainer's
    GPUs and release their memory while the actor trains."""

    server_urls: list[str] = field(default_factory=list)
    """Servers started elsewhere (http://host:port), e.g. on other nodes of a Slurm job. When
    empty, megarl starts `num_servers` servers itself."""

    router_url: Optional[str] = None
    """An sglang-router started elsewhere. When null and `use_router` is true, megarl starts one
    in front of the servers."""

    use_router: bool = True
    """Send requests through sglang-router (load balancing, cache-aware routing)."""

    router_policy: str = "cache_aware"
    """Load-balancing policy of the router megarl starts: cache_aware, round_robin,
    power_of_two or random."""

    router_args: dict[str, Any] = field(default_factory=dict)
    """Extra `python -m sglang_router.launch_router` flags, e.g. {retry_max_retries: 5}."""

    num_servers: int = 1
    """Servers megarl starts when `server_urls` is empty."""

    server_tp: int = 1
    """Tensor-parallel size of each SGLang server."""

    base_gpu_id: int = 0
    """First GPU of the first server megarl starts; server i uses the next `server_tp` GPUs."""

    mem_fraction_static: float = 0.8
    """SGLang's share of GPU memory for weights and KV cache."""

    host: str = "127.0.0.1"
    """Address the servers and the router megarl starts listen on."""

    base_port: int = 30000
    """Port of the first server megarl starts; server i listens on base_port + i; 0 picks free
    ports."""

    router_port: int = 30999
    """Port of the router megarl starts; 0 picks a free port."""

    server_args: dict[str, Any] = field(default_factory=dict)
    """Extra server flags: `python -m sglang.launch_server` flags for sglang, e.g.
    {chunked_prefill_size: 8192}; `python -m megarl.rollout.dev_server` flags for dev, e.g.
    {max_batch_size: 16}."""

    health_timeout_s: float = 900.0
    """Deadline for started servers to become healthy."""

    request_timeout_s: float = 1800.0
    """Time-out of one generation request."""

    max_retries: int = 3
    """Retries of a request after a connection error or a server failure."""

    retry_backoff_s: float = 1.0
    """First back-off between retries; it doubles each time."""

    max_concurrency: int = 256
    """Requests in flight at once across all servers."""

    prompts_per_step: int = 128
    """Prompts drawn per training step."""

    samples_per_prompt: int = 8
    """Responses sampled per prompt (the group size of GRPO-style advantages)."""

    temperature: float = 1.0
    """Sampling temperature; log-probs and entropies are computed at this temperature too."""

    top_p: float = 1.0
    """Nucleus sampling threshold of the rollout."""

    top_k: int = -1
    """Top-k sampling of the rollout; -1 for none."""

    max_new_tokens: int = 3072
    """Longest response in tokens (also the Dr.GRPO normaliser)."""

    stop: list[str] = field(default_factory=list)
    """Extra stop strings; the tokenizer's end-of-sequence token always stops."""

    def validate(self) -> None:
        check_choice("rollout", "backend", self.backend, ("sglang", "dev"))
        check_choice("rollout", "mode", self.mode, ("disaggregated", "colocated"))
        for i, url in enumerate(self.server_urls):
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"rollout.server_urls[{i}]", f"{url!r} is not an http(s) URL")
        if self.router_url is not None and not self.router_url.startswith(("http://", "https://")):
            raise ConfigError("rollout.router_url", f"{self.router_url!r} is not an http(s) URL")
        if self.router_url is not None and not self.server_urls:
            raise ConfigError("rollout.server_urls",
                              "must list the servers behind rollout.router_url: weight updates "
                              "go to every server directly, never through the router")
        check_choice("rollout", "router_policy", self.router_policy,
                     ("cache_aware", "round_robin", "power_of_two", "random"))
        if self.backend == "dev" and self.server_tp != 1:
            raise ConfigError("rollout.server_tp",
                              f"{self.server_tp}: the dev server runs one process per server, use 1")
        for name in ("num_servers", "server_tp", "max_concurrency", "prompts_per_step",
                     "samples_per_prompt", "max_new_tokens", "health_timeout_s",
                     "request_timeout_s"):
            check_positive("rollout", name, getattr(self, name))
        for name in ("base_gpu_id", "max_retries", "retry_backoff_s"):
            check_non_negative("rollout", name, getattr(self, name))
        check_range("rollout", "mem_fraction_static", self.mem_fraction_static, low=0, high=1,
                    low_open=True)
        check_range("rollout", "base_port", self.base_port, low=0, high=65535)
        check_range("rollout", "router_port", self.router_port, low=0, high=65535)
        check_positive("rollout", "temperature", self.temperature)
        check_range("rollout", "top_p", self.top_p, low=0, high=1, low_open=True)
        if self.top_k != -1:
            check_positive("rollout", "top_k", self.top_k)
