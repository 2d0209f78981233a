"""The RL loop. Every trainer rank runs it; see `Trainer` for who does what."""

from __future__ import annotations

from megarl.config import MegarlConfig
from megarl.trainer.trainer import StopRequested, Trainer


def train(cfg: MegarlConfig) -> int:
    """Run training to `trainer.num_steps` (or until SIGTERM/SIGINT); returns the last step."""
    with Trainer(cfg) as trainer:
        step = trainer.start_step - 1
        trainer.sync_weights(step)          # resumed or converted weights -> servers
        try:
            for step in trainer.steps():
                with trainer.timer.phase("rollout"):
                    batch = trainer.rollout(step)
                with trainer.timer.phase("log_probs"):
                    plan = trainer.log_probs(batch, step)
                with trainer.timer.phase("train"):
                    trained = trainer.train(plan)
                with trainer.timer.phase("sync"):
                    synced = trainer.sync_weights(step)
                trainer.log(step, batch, trained, synced)
                trainer.evaluate(step)
                trainer.save(step)
        except StopRequested:
            trainer.save(step, force=True)
        return step
