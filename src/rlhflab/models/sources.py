"""Where PPO and evaluation get their models: the run folder by default, or any HF folder / hub name.

``model.sft_policy`` (the SFT policy: PPO's initial policy and frozen reference) and
``model.reward_model`` (the trained RM) default to ``<run>/sft/policy`` and ``<run>/rm/reward``;
either may name a folder anywhere on disk (no run folder needed) or an ``owner/name`` hub
model, which is resolved to its local snapshot folder first (``huggingface_hub``, honouring
``HF_HUB_OFFLINE`` and the cache), so the rest of rlhflab only ever reads folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from rlhflab.errors import StageError


def is_hub_name(spec: str) -> bool:
    """``owner/name`` that is not an existing path (the same rule as the data loader's)."""
    return (not Path(spec).expanduser().exists() and spec.count("/") == 1
            and not spec.startswith((".", "/", "~")))


def resolve_model_dir(spec: Optional[str], default: Path, key: str, what: str, cmd: str) -> Path:
    """The local folder of a model given by config key ``key`` (``spec``), else ``default``.

    Raises a :class:`StageError` naming the key (or the stage to run) when there is no HF
    folder (``config.json``) there, or when a hub name cannot be fetched.
    """
    if spec is None:
        if not (default / "config.json").is_file():
            raise StageError(f"ppo needs the {what} at {default} (run `rlhflab {cmd}` with the same config first, "
                             f"or set {key} to an HF folder or hub name)")
        return default
    if is_hub_name(spec):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(spec))
        except Exception as e:  # offline, unknown repo, gated
            raise StageError(f"{key}={spec}: cannot fetch it from the Hugging Face hub ({type(e).__name__}: {e})") from None
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise StageError(f"{key}={spec}: no HF model folder there (expected {path / 'config.json'})")
    return path


def sft_policy_dir(cfg) -> Path:
    """``model.sft_policy``, else ``<run>/sft/policy``."""
    return resolve_model_dir(cfg.model.sft_policy, cfg.run_dir / "sft" / "policy", "model.sft_policy", "SFT policy", "sft")


def reward_model_dir(cfg, spec: Optional[str] = None) -> Path:
    """``spec`` (a reward source's ``path``), else ``model.reward_model``, else ``<run>/rm/reward``."""
    key = "reward.sources[].path" if spec else "model.reward_model"
    return resolve_model_dir(spec or cfg.model.reward_model, cfg.run_dir / "rm" / "reward", key, "reward model", "rm")
