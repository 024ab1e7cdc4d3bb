"""Loading and building policies (causal LMs) and their tokenizers."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from rlhflab.config import ArchConfig
from rlhflab.errors import StageError

PAD_TOKEN = "<|pad|>"


def load_tokenizer(path: str | Path, padding_side: str = "right"):
    """AutoTokenizer with a pad token distinct from EOS.

    Huang et al. detail: pad and EOS must differ, else "the last non-pad token" and the
    EOS-truncation logic confuse padding with the end of a response. Tokenizers without a
    pad token (GPT-2, Pythia) get ``<|pad|>`` added; the caller must then resize the
    model's embeddings (:func:`ensure_embeddings_fit`).
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise StageError(f"cannot load a tokenizer from {path}: {e}") from None
    if tok.eos_token is None:
        raise StageError(f"tokenizer at {path} has no eos_token; rlhflab needs one to end responses")
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    tok.padding_side = padding_side
    return tok


def disable_dropout(model: nn.Module) -> nn.Module:
    """Huang et al. detail: dropout off in every model of RLHF (policy, ref, RM, critic),
    so that logprobs of the rollout and of the training forward agree exactly."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    cfg = getattr(model, "config", None)
    for attr in ("dropout", "attention_dropout", "hidden_dropout", "hidden_dropout_prob",
                 "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout"):
        if cfg is not None and hasattr(cfg, attr):
            setattr(cfg, attr, 0.0)
    return model


def fuse_gelu(model: nn.Module) -> int:
    """Replace Python-composed tanh-GELU activations by the fused ``nn.GELU(approximate="tanh")``; in place.

    GPT-2 (``activation_function="gelu_new"``) and some other HF models compute
    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` as a chain of Python tensor ops
    (transformers' ``NewGELUActivation``, ``FastGELUActivation``, ``GELUTanh`` in its Python
    mode): about eight elementwise kernels over the ``[B, T, 4d]`` MLP activations, each
    output kept for backward. ``torch.nn.functional.gelu(x, approximate="tanh")`` is the
    same function in one kernel with a one-kernel backward; results differ only by float
    rounding (max abs difference ~1e-7 in float32, checked in ``tests/test_fast_paths.py``).
    On the CPU PPO benchmark (gpt2 4x256) those elementwise ops were ~15% of an update.

    Only the module objects change: the saved ``config.json`` still names the original
    activation, and the weights are untouched, so a saved model loads and computes the same
    anywhere. Returns the number of modules replaced.
    """
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    def composed_tanh_gelu(m: nn.Module) -> bool:
        if isinstance(m, (NewGELUActivation, FastGELUActivation)):
            return True
        # GELUTanh is already fused unless built with use_gelu_tanh_python=True.
        return isinstance(m, GELUTanh) and getattr(m.act, "__func__", None) is GELUTanh._gelu_tanh_python

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if composed_tanh_gelu(child):
                setattr(parent, name, nn.GELU(approximate="tanh"))
                replaced += 1
    return replaced


def ensure_embeddings_fit(model, tokenizer) -> None:
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    gc = getattr(model, "generation_config", None)
    if gc is not None:
        gc.pad_token_id = tokenizer.pad_token_id
        gc.eos_token_id = tokenizer.eos_token_id


def build_policy(tokenizer, policy_path: Optional[str] = None, arch: Optional[ArchConfig] = None, seed: int = 0):
    """A causal LM: ``from_pretrained(policy_path)``, or a randomly initialised Llama from ``arch``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if policy_path:
        try:
            model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
        except Exception as e:
            raise StageError(f"cannot load a causal LM from {policy_path}: {e}") from None
    else:
        arch = arch or ArchConfig()
        cfg = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
            num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_heads,
            max_position_embeddings=arch.max_position_embeddings, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
            attention_dropout=0.0,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = LlamaForCausalLM(cfg)
    ensure_embeddings_fit(model, tokenizer)
    return disable_dropout(model)


def load_policy(path: str | Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    if not Path(path).exists():
        raise StageError(f"policy directory not found: {path}")
    return disable_dropout(AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: cumsum(mask) - 1, clamped at 0. [B, T] -> [B, T].

    HF models default to positions 0..T-1 regardless of the mask, which shifts every token
    of a left-padded query; SFD passes these explicit position ids in every forward.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] of a causal LM on (possibly left-padded) sequences."""
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return out.logits


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
