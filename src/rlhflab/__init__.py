"""rlhflab: SFT -> reward model -> PPO -> evaluation -> best-of-N serving, after Huang et al. 2024.

The Python API (:mod:`rlhflab.api`): ``rlhflab.make_config``, ``rlhflab.sft``,
``rlhflab.train_reward_model``, ``rlhflab.ppo``, ``rlhflab.evaluate``, ``rlhflab.run``.
They are imported on first use, so ``import rlhflab`` (and the CLI) stays light.
"""

__version__ = "0.1.0"

API = ("make_config", "sft", "train_reward_model", "ppo", "evaluate", "run")
__all__ = ["__version__", *API]


def __getattr__(name: str):
    if name in API:
        from rlhflab import api

        return getattr(api, name)
    raise AttributeError(f"module 'rlhflab' has no attribute {name!r}")
