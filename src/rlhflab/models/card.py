"""Model cards: a ``README.md`` in every model folder the stages save.

The card opens with YAML front matter in the Hugging Face hub's model-card metadata
(``library_name``, ``pipeline_tag``, ``tags``, and ``base_model`` / ``datasets`` only when they
are hub names, since the hub reads them as repository ids), then says what was trained
from what: base model, data, the stage's evaluation numbers known when it was saved, how
to use it (for a reward model: its normalisation bias and ``RewardModel.score_texts``) and
the full resolved config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

STAGES = {
    "sft": ("SFT policy", "text-generation", "Supervised fine-tuning on (prompt, reference response) pairs."),
    "rm": ("Reward model", "text-classification",
           "Bradley-Terry reward model, score at the last token (EOS) of prompt + response."),
    "ppo": ("PPO policy", "text-generation", "PPO with a per-token KL penalty to the SFT policy (Huang et al. 2024)."),
    "ppo-value": ("PPO value model", "text-classification", "The critic (value head) trained alongside the PPO policy."),
}


def _hub_name(name: Optional[str]) -> Optional[str]:
    """``name`` when it looks like a hub repository id (``owner/name``, not an existing path)."""
    if not name or Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return None
    return name


def _data_sources(cfg) -> list[str]:
    d = cfg.data
    if d.task == "tldr-synth":
        return []
    return [s for s in (d.sft_dataset, d.preference_dataset, d.prompt_dataset) if s]


def _numbers(metrics: Optional[dict]) -> list[tuple[str, Any]]:
    out = []
    for k, v in (metrics or {}).items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out.append((k, f"{v:.4g}" if isinstance(v, float) else str(v)))
    return out


def model_card(cfg, stage: str, metrics: Optional[dict] = None, base_model: Optional[str] = None) -> str:
    """The card's text (``README.md``) for a model saved by ``stage`` (sft, rm, ppo, ppo-value)."""
    from rlhflab import __version__

    title, pipeline_tag, what = STAGES[stage]
    sources = _data_sources(cfg)
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": pipeline_tag,
                            "tags": ["rlhflab", "rlhf", stage.split("-")[0]]}
    if _hub_name(base_model):
        meta["base_model"] = base_model
    hub_data = [s for s in sources if _hub_name(s)]
    if hub_data:
        meta["datasets"] = hub_data
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {title}: {cfg.name}", "", f"{what} Trained with rlhflab {__version__}.", "",
             "## Base model", "", f"- {base_model or 'randomly initialised from model.arch (no pretrained weights)'}", "",
             "## Data", "", f"- data.task: `{cfg.data.task}`"]
    if cfg.data.task == "tldr-synth":
        lines.append(f"- tldr-synth, the built-in known-answer task (data.synth.seed={cfg.data.synth.seed})")
    lines += [f"- {s}" for s in sources]
    lines += ["", "## Evaluation", ""]
    nums = _numbers(metrics)
    if nums:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in nums]
    else:
        lines.append("No evaluation numbers were known when this model was saved (see the run's eval/results.json).")
    lines += ["", "## Usage", ""]
    if stage == "rm":
        bias = (metrics or {}).get("rm/bias")
        lines += [f"Scores are normalised as `raw - bias`; bias = {bias if bias is not None else 'see config.json'} "
                  "(`rlhflab_reward_bias` in config.json), the mean raw score of the reference responses, so that "
                  "they score about 0.", "", "```python", "from rlhflab.models.reward import RewardModel", "",
                  "rm = RewardModel.from_pretrained(\"<this folder>\")",
                  "scores = rm.score_texts([\"<prompt>\"], [\" <response>\"])  # normalised: raw - bias", "```"]
    elif stage == "ppo-value":
        lines += ["Loaded by rlhflab's PPO resume; not meant for use on its own."]
    else:
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  "tok = AutoTokenizer.from_pretrained(\"<this folder>\")",
                  "model = AutoModelForCausalLM.from_pretrained(\"<this folder>\")", "```", "",
                  "Or serve it best-of-N: `rlhflab serve --policy <this folder> --reward <reward folder>`."]
    lines += ["", "## Config", "", "```yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def write_model_card(out_dir: str | Path, cfg, stage: str, metrics: Optional[dict] = None,
                     base_model: Optional[str] = None) -> Path:
    """Write ``<out_dir>/README.md`` (see :func:`model_card`); returns its path."""
    path = Path(out_dir) / "README.md"
    path.write_text(model_card(cfg, stage, metrics, base_model))
    return path
