"""The Python API (notebooks, scripts): every stage as a function, taking configs and in-memory objects.

``import rlhflab`` exposes :func:`make_config`, :func:`sft`, :func:`train_reward_model`, :func:`ppo`,
:func:`evaluate` and :func:`run`. Each takes a ``config`` -- a :class:`~rlhflab.config.RunConfig`,
a dict of sections, or a YAML file / built-in config name -- plus ``overrides`` (a dict of dotted
keys, ``{"ppo.kl_coef": 0.1}``, or a list of ``"key=value"`` strings), and returns the stage's
summary dict (the same as the CLI prints; model folders are named in it).

In-memory objects are resolved into what the stages read, so the stage loops are the CLI's, and
a run made from Python can be resumed or inspected from the CLI:

* models (``transformers`` models, with their ``tokenizer``) are saved under
  ``<run>/inputs/<role>/`` and the matching config key points there (``model.policy`` for SFT,
  ``model.reward_backbone`` for the RM, ``model.sft_policy`` for PPO, ``model.reward_model``
  for a trained :class:`~rlhflab.models.reward.RewardModel`); a string is taken as a folder or
  hub name and only sets the key;
* datasets (a list of dicts, a ``datasets.Dataset``, or a dict ``{split: rows}`` of either) are
  written as JSON Lines under ``<run>/inputs/`` and ``data.task=tldr`` reads them
  (``data.sft_dataset`` / ``data.preference_dataset``); one list serves every split;
* reward functions (callables ``fn(prompts, completions, **columns) -> list[float]``, or
  ``(weight, fn)`` pairs) go to PPO in memory. They replace the default reward (the trained
  RM); when ``reward.sources`` is configured otherwise they are added to it. A later CLI
  ``--resume`` cannot see them -- for that, name them in the config as
  ``{kind: function, path: "package.module:function"}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from rlhflab.config import ConfigError, RunConfig, _merge, _read_yaml, _set_dotted, parse_overrides

ConfigLike = Union[RunConfig, dict, str, Path, None]
Overrides = Union[dict, Sequence[str], None]


# ----------------------------------------------------------------------------- config
def make_config(config: ConfigLike = None, overrides: Overrides = None) -> RunConfig:
    """A validated :class:`RunConfig` from a RunConfig, a dict of sections, or a YAML file /
    built-in name (default ``"default"``), with ``overrides`` applied (dotted keys)."""
    if isinstance(overrides, dict):  # values as given (no string parsing): {"name": "123"} stays a string
        upd: dict = {}
        for key, value in overrides.items():
            _set_dotted(upd, key, value)
    else:
        upd = parse_overrides(list(overrides or []))
    if isinstance(config, RunConfig):
        if not upd:
            return config
        tree = config.model_dump(mode="json")
    elif isinstance(config, dict):
        tree = config
    else:
        return _validate(_merge(_read_yaml(config or "default"), upd))
    return _validate(_merge(tree, upd))


def _validate(tree: dict) -> RunConfig:
    from pydantic import ValidationError

    from rlhflab.config import _format_validation_error

    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, "python api")) from None


def _with(cfg: RunConfig, **dotted: Any) -> RunConfig:
    tree = cfg.model_dump(mode="json")
    for key, value in dotted.items():
        node = tree
        *parents, leaf = key.split("__")
        for k in parents:
            node = node[k]
        node[leaf] = value
    return _validate(tree)


# ------------------------------------------------------------------- in-memory objects
def _save_model(model: Any, tokenizer: Any, out: Path, role: str) -> str:
    if tokenizer is None:
        raise ValueError(f"{role}: an in-memory model needs its tokenizer (tokenizer=...)")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def _model_key(cfg: RunConfig, model: Any, tokenizer: Any, role: str) -> Optional[str]:
    """A folder or hub name for ``model``: strings are kept, models are saved under <run>/inputs/<role>."""
    if model is None:
        return None
    if isinstance(model, (str, Path)):
        return str(model)
    return _save_model(model, tokenizer, cfg.run_dir / "inputs" / role, role)


def _rows(data: Any) -> list[dict]:
    if hasattr(data, "to_list"):  # datasets.Dataset
        return data.to_list()
    rows = list(data)
    if rows and not isinstance(rows[0], dict):
        raise ValueError(f"dataset rows must be dicts, got {type(rows[0]).__name__}")
    return rows


def _write_dataset(cfg: RunConfig, data: Any, kind: str) -> Optional[str]:
    """Rows -> <run>/inputs/<kind>.jsonl (every split) or <run>/inputs/<kind>/<split>.jsonl; returns the path."""
    if data is None:
        return None
    if isinstance(data, (str, Path)):
        return str(data)
    base = cfg.run_dir / "inputs"
    base.mkdir(parents=True, exist_ok=True)

    def write(path: Path, rows: list[dict]) -> None:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    splits = data if isinstance(data, dict) or hasattr(data, "keys") and not hasattr(data, "to_list") else None
    if splits is not None:
        (base / kind).mkdir(parents=True, exist_ok=True)
        for split in splits.keys():
            write(base / kind / f"{split}.jsonl", _rows(splits[split]))
        return str(base / kind)
    write(base / f"{kind}.jsonl", _rows(data))
    return str(base / f"{kind}.jsonl")


def _reward_fns(reward: Any) -> list[tuple[float, Callable]]:
    if reward is None:
        return []
    items = [reward] if callable(reward) or isinstance(reward, tuple) else list(reward)
    out = []
    for item in items:
        weight, fn = item if isinstance(item, tuple) else (1.0, item)
        if not callable(fn):
            raise ValueError(f"reward: expected a callable or (weight, callable), got {item!r}")
        out.append((float(weight), fn))
    return out


# ----------------------------------------------------------------------------- stages
def sft(config: ConfigLike = None, overrides: Overrides = None, *, model: Any = None, tokenizer: Any = None,
        dataset: Any = None, resume: bool = False, force: bool = False) -> dict:
    """Supervised fine-tuning (:func:`rlhflab.stages.sft.main`).

    ``model``: the initial causal LM (an HF model with ``tokenizer``, or a folder / hub name;
    default ``model.policy``). ``dataset``: SFT rows (id, subreddit, title, post, summary).
    """
    from rlhflab.stages.sft import main

    cfg = make_config(config, overrides)
    path = _model_key(cfg, model, tokenizer, "policy")
    if path:
        cfg = _with(cfg, model__policy=path, model__tokenizer=path)
    data = _write_dataset(cfg, dataset, "sft")
    if data:
        cfg = _with(cfg, data__task="tldr", data__sft_dataset=data)
    return main(cfg, resume=resume, force=force)


def train_reward_model(config: ConfigLike = None, overrides: Overrides = None, *, model: Any = None,
                       tokenizer: Any = None, dataset: Any = None, prompts: Any = None, resume: bool = False,
                       force: bool = False) -> dict:
    """Bradley-Terry reward model (:func:`rlhflab.stages.rm.main`).

    ``model``: the backbone (an HF model with ``tokenizer``, or a folder / hub name; default
    ``model.reward_backbone``). ``dataset``: preference rows; ``prompts``: SFT rows (the RM's
    normalisation bias is measured on their reference summaries).
    """
    from rlhflab.stages.rm import main

    cfg = make_config(config, overrides)
    path = _model_key(cfg, model, tokenizer, "reward_backbone")
    if path:
        cfg = _with(cfg, model__reward_backbone=path)
    data = _write_dataset(cfg, dataset, "preference")
    if data:
        cfg = _with(cfg, data__task="tldr", data__preference_dataset=data)
    sft_rows = _write_dataset(cfg, prompts, "sft")
    if sft_rows:
        cfg = _with(cfg, data__task="tldr", data__sft_dataset=sft_rows)
    return main(cfg, resume=resume, force=force)


def ppo(config: ConfigLike = None, overrides: Overrides = None, *, policy: Any = None, tokenizer: Any = None,
        reward_model: Any = None, reward: Any = None, prompts: Any = None, resume: bool = False,
        force: bool = False) -> dict:
    """PPO (:func:`rlhflab.stages.ppo.main`).

    ``policy``: the SFT policy (an HF model with ``tokenizer``, or a folder / hub name; default
    ``model.sft_policy`` / ``<run>/sft/policy``); ``reward_model``: a trained
    :class:`~rlhflab.models.reward.RewardModel` or its folder (default ``model.reward_model``);
    ``reward``: a reward function, a ``(weight, fn)`` pair, or a list of them (see the module
    docstring; given together with ``reward_model``, the RM stays in the sum); ``prompts``: SFT
    rows whose queries PPO trains on.
    """
    from rlhflab.stages.ppo import main

    cfg = make_config(config, overrides)
    path = _model_key(cfg, policy, tokenizer, "sft_policy")
    if path:
        cfg = _with(cfg, model__sft_policy=path)
    if reward_model is not None:
        if isinstance(reward_model, (str, Path)):
            rm_path = str(reward_model)
        else:
            rm_path = str(cfg.run_dir / "inputs" / "reward_model")
            reward_model.save(rm_path)
        cfg = _with(cfg, model__reward_model=rm_path)
    fns = _reward_fns(reward)
    if fns and cfg.reward == RunConfig().reward and reward_model is None:  # functions replace the default RM reward
        cfg = _with(cfg, reward__sources=[])
    data = _write_dataset(cfg, prompts, "sft")
    if data:
        cfg = _with(cfg, data__task="tldr", data__sft_dataset=data)
    return main(cfg, resume=resume, force=force, reward_fns=fns)


def evaluate(config: ConfigLike = None, overrides: Overrides = None, *, policies: Optional[dict] = None,
             tokenizer: Any = None, include_defaults: bool = True, reward_model: Any = None) -> dict:
    """Evaluation (:func:`rlhflab.stages.evaluate.main`) of the run's policies and ``policies``
    (``{name: HF model or folder}``; in-memory models need ``tokenizer``)."""
    from rlhflab.stages.evaluate import main

    cfg = make_config(config, overrides)
    dirs = {name: _model_key(cfg, m, tokenizer, f"policies/{name}") for name, m in (policies or {}).items()}
    rm_path = None
    if reward_model is not None:
        rm_path = str(reward_model) if isinstance(reward_model, (str, Path)) else str(cfg.run_dir / "inputs" / "reward_model")
        if not isinstance(reward_model, (str, Path)):
            reward_model.save(rm_path)
    return main(cfg, policies=dirs, include_defaults=include_defaults, reward_path=rm_path)


def run(config: ConfigLike = None, overrides: Overrides = None, *, seeds: int = 1) -> dict:
    """The whole pipeline, data -> SFT -> RM -> PPO -> eval -> report (:func:`rlhflab.pipeline.run_pipeline`)."""
    from rlhflab.pipeline import run_pipeline

    return run_pipeline(make_config(config, overrides), seeds=seeds)
