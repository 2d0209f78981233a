"""The Megatron actor: log-prob passes, the train step, the optimizer."""
