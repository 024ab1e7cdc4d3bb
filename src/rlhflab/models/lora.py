"""LoRA adapters through peft for the SFT, RM and PPO stages (``model.lora``).

The stages keep working on the plain transformers model: :func:`apply_lora` injects peft's
LoRA layers into it IN PLACE (``peft.get_peft_model``) and returns that same HF model --
``LlamaForCausalLM``, ``...ForSequenceClassification`` -- so every forward, ``base_model``
and ``score`` access, state dict and checkpoint of the stages is unchanged. The
``PeftModel`` wrapper stays reachable through :func:`peft_model` for what needs it: saving
the adapter and switching it off.

What trains: the adapter matrices A, B of every targeted linear layer and, for reward
models and critics (``task="seq_cls"``), the score head (peft's ``modules_to_save``:
the head is new, it must train, and it is saved with the adapter). Everything else is
frozen (``requires_grad=False``: no gradient, no AdamW state).

PPO's reference policy with LoRA is the policy itself with the adapter switched off
(:class:`AdapterDisabledReference`, peft's ``disable_adapter()``): a LoRA layer with its
adapter disabled returns exactly ``base_layer(x)``, the same kernels on the same weights
as a separate frozen copy of the SFT policy, so the reference logprobs are bit for bit
those of the copy (``tests/test_lora.py``) -- with one copy of the weights fewer. TRL's
PPO trainer does the same with a ``peft_config`` (reference = ``disable_adapter()``);
OpenRLHF and verl expose it as ``lora_rank``.

Outputs of a LoRA stage (:func:`save_outputs`): ``<stage>/<name>_adapter/``
(``PeftModel.save_pretrained``: ``adapter_config.json`` naming the base model folder, and
``adapter_model.safetensors``), and, with ``model.lora.merge_on_save`` (default), the
merged model in the stage's usual folder (``merge_and_unload`` then ``save_pretrained``),
a plain transformers model that later stages, eval and serve read as before.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
from torch import nn

from rlhflab.config import LoraSettings
from rlhflab.errors import StageError

Task = Literal["causal", "seq_cls"]
_PEFT_ATTR = "_rlhflab_peft_model"  # plain instance attribute: not a registered submodule


def lora_active(settings: Optional[LoraSettings], stage: str) -> bool:
    """Whether ``stage`` ('sft', 'rm', 'ppo') trains adapters under ``model.lora``."""
    return bool(settings is not None and settings.enabled and stage in settings.stages)


def _peft():
    try:
        import peft
    except ImportError:
        raise StageError("model.lora.enabled=true needs the package peft (pip install 'rlhflab[lora]' or pip install peft)") from None
    return peft


def peft_config(settings: LoraSettings, task: Task, base_path: Optional[str | Path] = None):
    """The ``peft.LoraConfig`` of ``model.lora`` for a causal LM or a 1-label classifier (RM, critic)."""
    peft = _peft()
    target = settings.target_modules
    return peft.LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=target if isinstance(target, str) else list(target), bias="none",
        task_type=peft.TaskType.CAUSAL_LM if task == "causal" else peft.TaskType.SEQ_CLS,
        base_model_name_or_path=(str(Path(base_path).resolve()) if Path(base_path).exists() else str(base_path))
        if base_path else None,
    )


def apply_lora(model: nn.Module, settings: LoraSettings, task: Task, base_path: Optional[str | Path] = None) -> nn.Module:
    """Inject LoRA layers into ``model`` in place; returns the same HF model, only adapters (+ head) trainable.

    ``task="seq_cls"`` also trains and saves the score/classifier head (peft's ``modules_to_save``).
    ``base_path``: the folder the base weights come from, written into ``adapter_config.json``.
    Refuses a target list that matches no module, naming ``model.lora.target_modules``.
    """
    if is_lora(model):
        raise StageError("apply_lora: the model already has LoRA adapters")
    config = peft_config(settings, task, base_path)
    # get_peft_model overwrites base_model_name_or_path with the model's name_or_path (None for a fresh model)
    base_name, config.base_model_name_or_path = config.base_model_name_or_path, None
    try:
        wrapped = _peft().get_peft_model(model, config)
    except ValueError as e:
        raise StageError(f"model.lora.target_modules={settings.target_modules!r} does not fit "
                         f"{type(model).__name__}: {e}") from None
    if base_name:
        wrapped.peft_config[wrapped.active_adapter].base_model_name_or_path = base_name
    inner = wrapped.get_base_model()
    object.__setattr__(inner, _PEFT_ATTR, wrapped)
    return inner


def is_lora(model: Any) -> bool:
    return getattr(model, "__dict__", {}).get(_PEFT_ATTR) is not None


def peft_model(model: nn.Module):
    """The ``PeftModel`` around a model returned by :func:`apply_lora`."""
    wrapped = model.__dict__.get(_PEFT_ATTR)
    if wrapped is None:
        raise ValueError(f"{type(model).__name__} has no LoRA adapter (apply_lora was not called on it)")
    return wrapped


@contextmanager
def adapter_disabled(model: nn.Module):
    """Inside: ``model`` computes with its base weights only (peft's ``disable_adapter()``)."""
    with peft_model(model).disable_adapter():
        yield


class AdapterDisabledReference:
    """PPO's reference policy as a view of the LoRA policy with its adapter off: no second copy.

    Callable like the HF model (``ref(input_ids=..., ...)``), always without gradients. It
    holds no parameters of its own, so ``.eval()``/``.requires_grad_()``/``.to()`` are
    no-ops that return it (the policy's training mode never matters: dropout is off in
    every RLHF model, Huang detail).
    """

    def __init__(self, policy: nn.Module):
        peft_model(policy)  # refuses a policy without adapter
        self.policy = policy

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), adapter_disabled(self.policy):
            return self.policy(*args, **kwargs)

    def eval(self):
        return self

    def requires_grad_(self, requires_grad: bool = True):
        return self

    def to(self, *args, **kwargs):
        return self

    def parameters(self):
        return iter(())

    def modules(self):
        return iter(())


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{"trainable": ..., "total": ...}`` parameter counts (a LoRA model's total includes its adapters)."""
    return {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in model.parameters())}


def lora_parameter_counts(model_config, settings: Optional[LoraSettings], task: Task = "causal") -> dict[str, int]:
    """Trainable and total parameter counts of a model built from ``model_config`` (an HF
    ``PretrainedConfig``) with ``model.lora`` applied -- for a planner, no weights allocated.

    The model is built on the ``meta`` device (shapes only); with ``settings`` None or
    disabled every parameter is trainable. Returns ``{"trainable", "total", "base"}``
    (``base``: the model without adapters; ``total - base`` = the adapters' parameters).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device("meta"):
        if task == "causal":
            model = AutoModelForCausalLM.from_config(model_config)
        else:
            model_config = copy.deepcopy(model_config)
            model_config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(model_config)
    base = sum(p.numel() for p in model.parameters())
    if settings is None or not settings.enabled:
        return {"trainable": base, "total": base, "base": base}
    counts = count_parameters(apply_lora(model, settings, task))
    return {**counts, "base": base}


def check_resume_state(saved_state: dict, model: nn.Module, ckpt: Path) -> None:
    """Refuse, naming ``model.lora.enabled``, a checkpoint written with(out) LoRA resumed without (with) it."""
    saved = any("lora_" in k for k in saved_state)
    if saved != is_lora(model):
        raise StageError(f"cannot resume from {ckpt}: it was written with model.lora.enabled={str(saved).lower()}, "
                         f"the config now says {str(not saved).lower()}; restore it or start a new run")


# ------------------------------------------------------------------------------- saving
def save_outputs(model: nn.Module, tokenizer, stage_dir: Path, name: str, settings: LoraSettings,
                 atomic_save_dir: Callable[[Path, Callable[[Path], None]], None],
                 save_merged: Optional[Callable[[Path], None]] = None) -> dict[str, str]:
    """Write a stage's trained model; returns ``{"adapter_dir"?, "<name>_dir"?}`` for its metrics.

    Without LoRA: ``<stage>/<name>`` = ``model.save_pretrained`` + tokenizer (as before).
    With LoRA: ``<stage>/<name>_adapter`` (peft adapter + tokenizer), then, when
    ``settings.merge_on_save``, the adapter is merged into the base IN PLACE (the stage is
    over; the function is unchanged) and ``<stage>/<name>`` gets the merged model, written by
    ``save_merged(tmp_dir)`` when given (e.g. ``RewardModel.save``, which adds its bias) or
    by ``save_pretrained`` + tokenizer.
    """
    out: dict[str, str] = {}

    def plain(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    if not is_lora(model):
        atomic_save_dir(stage_dir / name, save_merged or plain)
        return {f"{name}_dir": str(stage_dir / name)}

    wrapped = peft_model(model)

    def adapter(tmp: Path) -> None:
        wrapped.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    atomic_save_dir(stage_dir / f"{name}_adapter", adapter)
    out["adapter_dir"] = str(stage_dir / f"{name}_adapter")
    if settings.merge_on_save:
        merge_in_place(model)
        atomic_save_dir(stage_dir / name, save_merged or plain)
        out[f"{name}_dir"] = str(stage_dir / name)
    return out


def merge_in_place(model: nn.Module) -> nn.Module:
    """Fold the adapter into the base weights of ``model`` (peft ``merge_and_unload``); the
    LoRA layers become plain ``nn.Linear`` again and ``model`` is no longer a LoRA model."""
    wrapped = peft_model(model)
    merged = wrapped.merge_and_unload()
    if merged is not model:  # peft returns the same inner model; keep callers' references valid
        raise StageError("peft merge_and_unload returned a new model object; rlhflab expects an in-place merge")
    model.__dict__.pop(_PEFT_ATTR, None)
    return model


def load_adapter_model(base_dir: str | Path, adapter_dir: str | Path, task: Task = "causal"):
    """Base model + saved adapter with plain transformers + peft (what a user does with the outputs)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if task == "causal" else AutoModelForSequenceClassification
    kwargs = {} if task == "causal" else {"num_labels": 1}
    base = auto.from_pretrained(str(base_dir), dtype=torch.float32, **kwargs)
    return _peft().PeftModel.from_pretrained(base, str(adapter_dir))
