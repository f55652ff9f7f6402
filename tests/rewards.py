"""Reward functions for tests (``reward_fn: tests.rewards:NAME``)."""


def constant(sample: dict) -> float:
    """Every response scores the same: every online-DPO pair ties, every GRPO group has zero advantage."""
    return 1.0
