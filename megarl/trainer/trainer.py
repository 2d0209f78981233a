"""The parts of a training run and the named calls the loop (`megarl.trainer.loop`) makes.

Who does what:
- every trainer rank builds the same Megatron actor shard, runs the log-prob passes and train
  steps, and takes part in the (collective) weight export;
- global rank 0 alone starts or connects to the rollout servers and the router, draws prompts,
  generates, scores, records, evaluates, logs, and joins the servers' weight-update group;
- the rollout batch reaches every TP/PP/DP rank by one broadcast of plain lists from rank 0;
  each rank then builds the same samples and the same deterministic micro-batch plan.

Faults (rank 0, broadcast weight sync): after each rollout and before each sync the servers'
health is checked; a failed server is taken out of rotation and restarted when megarl started
it (`RolloutServers.check`). The next sync waits for it, rebuilds the weight-update group with
it, sends every server the new weights, and only then puts it back into rotation, so it never
serves stale weights. A stop signal (SIGTERM, SIGINT) finishes the current step, checkpoints
and returns; a second SIGINT stops at once, repeated SIGTERMs (launchers forward them) do not.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megarl.actor.actor import IterationPlan, MegatronActor
from megarl.checkpoint.export import export_hf_weights, export_hf_weights_everywhere
from megarl.checkpoint.model_io import load_hf_into_model, load_megatron_checkpoint
from megarl.config import MegarlConfig, to_yaml
from megarl.losses import build_loss
from megarl.metrics import PhaseTimer, TrainingMonitor
from megarl.models.hf import shape_from_hf_dir
from megarl.parallel import init_distributed, teardown
from megarl.rollout.batch import RolloutBatch
from megarl.sync.base import make_weight_sync
from megarl.sync.colocated import server_group
from megarl.trainer import experience
from megarl.trainer.checkpoint import Checkpointer

logger = logging.getLogger(__name__)


class StopRequested(Exception):
    """SIGTERM/SIGINT arrived; the loop checkpoints and exits cleanly."""


class Trainer:
    """One rank's view of a run: the actor on every rank, the rollout side on rank 0."""

    def __init__(self, cfg: MegarlConfig) -> None:
        self.sync = self.client = self.scorer = self.servers = self.sampler = None
        try:
            self._build(cfg)
        except BaseException:
            self.close()   # servers may be up already: never leave them behind
            raise

    def _build(self, cfg: MegarlConfig) -> None:
        self.cfg = cfg
        self.shape, self.hf_config = shape_from_hf_dir(cfg.model.hf_dir)
        # Tear down only what this trainer started (an embedding program may own the group).
        self._owns_process_group = not dist.is_initialized()
        self.ctx = init_distributed(cfg.parallel, self.shape, seed=cfg.trainer.seed,
                                    vocab_divisible_by=cfg.model.make_vocab_size_divisible_by)
        self.is_driver = self.ctx.rank == 0
        self.colocated = cfg.rollout.mode == "colocated"
        self.output_dir = Path(cfg.logging.output_dir)
        if self.is_driver:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(to_yaml(cfg))
        self.tokenizer = _load_tokenizer(cfg.model.hf_dir)
        self.objective = build_loss(cfg.algorithm, cfg.entropy, cfg.rollout, seed=cfg.trainer.seed)
        self.actor = MegatronActor(cfg, self.shape, self.ctx, self.objective,
                                   pad_id=_pad_id(self.tokenizer),
                                   total_optimizer_steps=self.optimizer_steps())
        self._load_initial_weights()
        if cfg.algorithm.kl_coef > 0:
            self.actor.snapshot_reference()
        self.checkpointer = Checkpointer(cfg, self.ctx, self.output_dir)
        self.checkpointer.find()   # a broken checkpoint fails now, not after server start-up
        self._sync_members: list[str] = []
        self._first_log = True
        if self.is_driver and cfg.trainer.replay_dir is None:
            self._start_rollout()
        self.start_step = self.checkpointer.resume(self) + 1
        self.monitor = TrainingMonitor(cfg.logging, cfg.trainer, start_step=self.start_step,
                                       run_config=_plain(cfg))
        self.checkpointer.restore_monitor(self)
        self.sync = self._connect_sync()
        self.timer = PhaseTimer()
        self._stop = False
        self._previous_handlers = {s: signal.signal(s, self._request_stop)
                                   for s in (signal.SIGTERM, signal.SIGINT)}

    # --- set-up --------------------------------------------------------------------------------

    def optimizer_steps(self) -> int:
        algo, rollout = self.cfg.algorithm, self.cfg.rollout
        per_step = -(-rollout.prompts_per_step // (algo.prompts_per_mini_batch
                                                    or rollout.prompts_per_step))
        return self.cfg.trainer.num_steps * algo.ppo_epochs * per_step

    def _load_initial_weights(self) -> None:
        if self.cfg.model.megatron_dir is not None:
            load_megatron_checkpoint(self.actor.model, self.cfg.model.megatron_dir, self.ctx)
        else:
            load_hf_into_model(self.actor.model, self.cfg.model.hf_dir, self.ctx, self.shape)

    def _start_rollout(self) -> None:
        from megarl.rollout import (
            PromptDataset, PromptSampler, RewardComputer, RolloutClient, RolloutServers,
        )

        cfg = self.cfg
        self.sampler = PromptSampler(PromptDataset.from_config(cfg.data, self.tokenizer),
                                     seed=cfg.trainer.seed, shuffle=cfg.data.shuffle)
        self.scorer = RewardComputer.from_config(cfg.reward)
        self.servers = RolloutServers(cfg.rollout, model_path=cfg.model.hf_dir,
                                      log_dir=str(self.output_dir / "logs")).start()
        self.client = RolloutClient.from_config(cfg.rollout, self.servers.generate_urls)

    def _connect_sync(self, urls: Optional[list[str]] = None):
        if self.cfg.trainer.replay_dir is not None:
            return None
        if urls is None:
            urls = experience.broadcast_object(self.servers.server_urls if self.is_driver else None)
        sync = make_weight_sync(self.cfg.sync, urls, rank=self.ctx.rank,
                                server_tp=self.cfg.rollout.server_tp,
                                colocated_group=server_group(len(urls), self.cfg.rollout.server_tp)
                                if self.colocated else None)
        sync.connect()
        self._sync_members = list(urls)
        return sync

    # --- the named calls of the loop -----------------------------------------------------------

    def steps(self):
        """Step numbers to run; stops after the step during which a stop was requested."""
        for step in range(self.start_step, self.cfg.trainer.num_steps + 1):
            yield step
            if self._stop_agreed():
                raise StopRequested()

    def rollout(self, step: int) -> RolloutBatch:
        """Rank 0 generates (or replays) and scores the step's batch; every rank receives it.
        Colocated, the trainer frees its GPUs for the generation and takes them back after."""
        colocated = self.colocated and self.sync is not None
        if colocated:
            self.actor.offload_for_rollout()
        batch = self._generate(step)
        if colocated:
            self.sync.release_memory()
            self.actor.restore_for_training()
        return batch

    def _generate(self, step: int) -> RolloutBatch:
        batch = None
        if self.is_driver:
            if self.cfg.trainer.replay_dir is not None:
                batch = experience.replay(self.cfg.trainer.replay_dir, step)
            else:
                from megarl.rollout import collect_rollout_batch

                batch = collect_rollout_batch(
                    client=self.client, sampler=self.sampler, scorer=self.scorer,
                    tokenizer=self.tokenizer, rollout=self.cfg.rollout,
                    algorithm=self.cfg.algorithm)
                if self.cfg.trainer.record_rollouts:
                    experience.record(batch, self.output_dir / "rollouts", step)
                self._check_servers()
        return experience.broadcast_object(batch)

    def log_probs(self, batch: RolloutBatch, step: int) -> IterationPlan:
        """Samples with advantages, this rank's plan, and the old (and reference) log-probs."""
        samples = experience.samples_from_batch(batch, self.cfg.algorithm)
        plan = self.actor.plan(samples, iteration=step)
        request = self.objective.request
        # The old pass also gives the entropies some interventions need (SIREN's anchor).
        if (not self.cfg.algorithm.use_rollout_logprobs or request.entropy
                or request.nucleus_top_p is not None):
            self.actor.compute_log_probs(plan)
        if self.cfg.algorithm.kl_coef > 0:
            with self.timer.phase("ref_log_probs"):
                self.actor.compute_log_probs(plan, reference=True)
        return plan

    def train(self, plan: IterationPlan) -> dict[str, float]:
        return experience.mean_over_steps(self.actor.train(plan))

    def sync_weights(self, step: int) -> dict[str, float]:
        """Send the new weights to every server (every rank takes part in the export)."""
        if self.sync is None:
            return {}
        returning = self._resync_members() if self.is_driver else []
        # Colocated, every rank hands its own copy to the server rank on its GPU.
        export = export_hf_weights_everywhere if self.colocated else export_hf_weights
        stats = self.sync.update(export(self.actor.model, self.shape, self.ctx), version=str(step))
        if returning:
            self.servers.return_to_rotation(returning)
            self.client.set_urls(self.servers.generate_urls)
        if not self.is_driver:
            return {}
        return {f"sync/{k}": float(v) for k, v in stats.as_dict().items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def log(self, step: int, batch: RolloutBatch, trained: dict[str, float],
            synced: dict[str, float]) -> dict[str, float]:
        metrics = experience.rollout_metrics(batch) | trained | synced | self.timer.metrics()
        step_time = metrics.get("time/step", 0.0)
        tokens = sum(len(p) + len(r) for p, r in zip(batch.prompt_token_ids,
                                                     batch.response_token_ids))
        metrics["throughput/tokens_per_s"] = tokens / step_time if step_time > 0 else 0.0
        metrics["trainer/skipped_steps"] = float(self.actor.num_skipped_steps)
        metrics |= self._fault_metrics()
        self.timer.reset()
        logged = self.monitor.step(step, metrics)   # logged first: the record shows the skip
        self._check_nonfinite()
        return logged

    def evaluate(self, step: int) -> None:
        interval = self.cfg.eval.interval
        if not interval or step % interval or not self.cfg.eval.benchmarks:
            return
        if self.is_driver and self.client is not None:
            from megarl.eval.evaluate import evaluate, flat_metrics

            result = evaluate(self.client, self.tokenizer, self.cfg.eval.benchmarks, self.cfg.eval,
                              reward=self.scorer)
            self.monitor.log(step, flat_metrics(result))

    def save(self, step: int, *, force: bool = False) -> None:
        interval = self.cfg.checkpoint.save_interval
        if force or step == self.cfg.trainer.num_steps or (interval and step % interval == 0):
            self.checkpointer.save(self, step)

    # --- reliability ---------------------------------------------------------------------------

    def _fault_metrics(self) -> dict[str, float]:
        """Server rotation and (on the first step this process logs) bad dataset rows."""
        out: dict[str, float] = {}
        if self.servers is not None:
            out["servers/num_in_rotation"] = float(len(self.servers.in_rotation))
            out["servers/num_restarts"] = float(self.servers.num_restarts)
        if self._first_log and self.sampler is not None:
            stats = self.sampler.dataset.stats
            out |= {"data/num_rows": float(stats.num_rows),
                    "data/num_malformed_rows": float(stats.num_malformed),
                    "data/num_too_long_rows": float(stats.num_too_long)}
        self._first_log = False
        return out

    def _check_servers(self) -> None:
        """Rank 0: take failed servers out of rotation (and restart them); with the colocated
        transport the servers share the trainer's GPUs and are only reported."""
        if self.servers is None:
            return
        if self.cfg.sync.transport != "broadcast":
            self.servers.report_unhealthy()
            return
        if self.servers.check():
            self.client.set_urls(self.servers.generate_urls)

    def _resync_members(self) -> list[str]:
        """Rank 0, before a sync: the servers back from a restart, which this sync brings up to
        date; when the servers changed (one left, or a restarted process, which is in no group,
        came back), the weight-update group is rebuilt over them."""
        if self.servers is None or self.cfg.sync.transport != "broadcast":
            return []
        self._check_servers()
        returning = self.servers.ready_to_return()
        members = [u for u in self.servers.server_urls
                   if u in self.servers.in_rotation or u in returning]
        if not members:
            raise RuntimeError("no rollout server is healthy and none could be restarted; "
                               f"see the server logs in {self.servers.log_dir}")
        if returning or members != self._sync_members:
            logger.warning("weight-update group rebuilt over %d servers: %s", len(members),
                           ", ".join(members))
            self.sync.close()
            self.sync = self._connect_sync(members)
        return returning

    def _check_nonfinite(self) -> None:
        limit = self.cfg.trainer.max_nonfinite_steps
        run = self.actor.consecutive_skipped_steps
        if run >= limit:
            raise RuntimeError(
                f"{run} optimizer steps in a row had a NaN/inf loss or gradient "
                f"(trainer.max_nonfinite_steps = {limit}): stopping. The last checkpoint is "
                f"intact; lower optimizer.lr or check the data of the recent steps."
            )

    def _request_stop(self, signum, frame) -> None:
        if self._stop:
            if signum == signal.SIGINT:  # Ctrl-C twice: a person wants out now
                signal.signal(signum, self._previous_handlers.get(signum, signal.SIG_DFL))
                raise KeyboardInterrupt
            # torchrun forwards the SIGTERM that Slurm also sends to every task: not a reason
            # to lose the step; the scheduler's SIGKILL ends the run if it must.
            logger.warning("received SIGTERM again: still finishing the step")
            return
        self._stop = True
        logger.warning("received %s: finishing this step, checkpointing, then exiting",
                       signal.Signals(signum).name)

    def _stop_agreed(self) -> bool:
        flag = torch.tensor([1.0 if self._stop else 0.0], device=self.ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self._stop = bool(flag.item())
        return self._stop

    # --- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        for closer in (self.sync, self.client, self.scorer, self.servers):
            if closer is not None:
                try:
                    (closer.stop if hasattr(closer, "stop") else closer.close)()
                except Exception:  # noqa: BLE001 - teardown must reach every part
                    logger.exception("error while shutting down %s", type(closer).__name__)
        if getattr(self, "monitor", None) is not None:
            self.monitor.close()
        for sig, handler in getattr(self, "_previous_handlers", {}).items():
            signal.signal(sig, handler)
        if hasattr(self, "ctx"):
            teardown(destroy_process_group=self._owns_process_group)

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _load_tokenizer(hf_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _plain(cfg: MegarlConfig) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))
