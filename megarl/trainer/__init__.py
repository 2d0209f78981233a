"""The RL loop, advantages, metrics and logging."""
