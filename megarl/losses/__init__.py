"""Policy losses, the KL penalty, aggregation and the entropy interventions (spec sections 2-3).

The losses never see logits: they take the per-token tensors that `megarl.ops` computes on
the vocab shards (log-probs, entropy, nucleus entropy) and the micro-batch's own per-token
tensors (`MicroBatch`), and return `(loss, metrics)`.

How the actor drives them (every `dp_group` argument is the data-parallel group of the
trainer, None for one DP rank; the marked calls are collective over it)::

    objective = build_loss(cfg.algorithm, cfg.entropy, cfg.rollout, seed=cfg.trainer.seed)
    objective.load_state_dict(saved)                  # on resume (state is the same on all ranks)

    for each training step (one rollout batch):
        # old-log-prob pass, no grad, same ops arguments as training:
        for mb in all micro-batches of the rollout batch on this rank:
            stats = vocab_parallel_token_stats(logits, targets, tp_group=tp,
                                               real_vocab_size=V, **objective.stats_kwargs)
            mb.old_log_probs = stats.log_probs
            mb.old_entropy = stats.entropy                    # AER/metrics, optional
            mb.old_nucleus_entropy = stats.nucleus_entropy    # SIREN needs it
        objective.begin_iteration(all_micro_batches, dp_group)        # collective
        for each optimizer step (mini-batch) and PPO epoch:
            step = objective.begin_step(micro_batches_of_step, dp_group)   # collective
            for mb in micro_batches_of_step:               # Megatron's forward_backward_func
                stats = vocab_parallel_token_stats(logits, targets, ..., **objective.stats_kwargs)
                loss, metrics = objective(stats, mb, step)
                step_metrics.update(metrics)
                loss.backward()                            # see scaling below
            optimizer.step()
            objective.end_step(step)                                       # collective
            log(step_metrics.reduce(dp_group))                             # collective

Scaling: each micro-batch's `loss` is already its share of the step's global aggregate (the
normalisers are the step's valid tokens and responses over all micro-batches and DP ranks),
so the sum over micro-batches and DP ranks is the step's loss. Megatron divides each
micro-batch loss by num_microbatches and averages gradients over DP; the actor undoes both
(multiply by num_microbatches * dp_size, or tell Megatron not to average), after which the
gradients do not depend on the micro-batch size or the DP size.

Metrics are `Metrics` objects: (sum, count) pairs that add exactly over micro-batches and
reduce over DP with one all-reduce; see `megarl.losses.metrics` for each kind.
"""

from .batch import MicroBatch, rows_to_seq_ids
from .interventions import (
    REGISTRY, Intervention, LossInputs, StatsRequest, StepContext, build_intervention,
    resolve_intervention,
)
from .kl import KLPenalty, kl_estimate
from .metrics import Metrics
from .objective import PolicyObjective, build_loss
from .policy import ClippedSurrogate, SurrogateOutput
from .reduce import Aggregator, StepNormalizers, segment_quantile, segment_sum

__all__ = [
    "Aggregator", "ClippedSurrogate", "Intervention", "KLPenalty", "LossInputs", "Metrics",
    "MicroBatch", "PolicyObjective", "REGISTRY", "StatsRequest", "StepContext",
    "StepNormalizers", "SurrogateOutput", "build_intervention", "build_loss", "kl_estimate",
    "resolve_intervention", "rows_to_seq_ids", "segment_quantile", "segment_sum",
]
