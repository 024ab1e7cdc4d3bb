"""Loading and building policies (causal LMs) and their tokenizers."""

from __future__ import annotations

import math
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


_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


class _SigmoidTanhGELU(torch.autograd.Function):
    """``0.5 x (1 + tanh(c (x + a x^3)))`` computed as ``x * sigmoid(2c (x + a x^3))``.

    The identity ``0.5 (1 + tanh(u)) = sigmoid(2u)`` makes these the same function. On CPU
    (torch 2.13, AVX2) the fused ``gelu(approximate="tanh")`` kernel spends its time in a
    slow vectorised ``tanh``, while ``sigmoid`` is ~3x faster than ``tanh``: five in-place
    passes over a fresh buffer take 3.3 ms against the kernel's 6.8 ms on a [1872, 1024]
    float32 tensor (one thread). The backward is torch's own ``gelu_backward`` on the saved
    input, i.e. exactly the fused kernel's gradient. Forward values agree with the fused
    kernel to float rounding (max abs difference to a float64 reference ~1e-6 for both;
    ``tests/test_fast_paths.py``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x * x
        y.mul_(2 * _GELU_C * _GELU_A).add_(2 * _GELU_C).mul_(x).sigmoid_().mul_(x)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return torch.ops.aten.gelu_backward(grad, x, approximate="tanh")


class TanhGELU(nn.Module):
    """Tanh-approximate GELU (GPT-2's ``gelu_new``) with the fastest exact kernel per device:
    :class:`_SigmoidTanhGELU` for float32/float64 on CPU, ``gelu(approximate="tanh")``
    (one fused kernel) everywhere else (CUDA, bf16 autocast)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
            return _SigmoidTanhGELU.apply(x)
        return nn.functional.gelu(x, approximate="tanh")


def fuse_gelu(model: nn.Module) -> int:
    """Replace every tanh-GELU activation by :class:`TanhGELU`; in place.

    GPT-2 (``activation_function="gelu_new"``) and some other HF models compute
    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` as a chain of Python tensor ops
    (transformers' ``NewGELUActivation``, ``FastGELUActivation``, ``GELUTanh`` in its Python
    mode): about eight elementwise kernels over the ``[B, T, 4d]`` MLP activations, each
    output kept for backward. :class:`TanhGELU` is the same function in one fused kernel
    (or, on CPU, five in-place passes through ``sigmoid``) with a one-kernel backward;
    results differ only by float rounding (checked in ``tests/test_fast_paths.py``). On the
    CPU PPO benchmark (gpt2 4x256) the composed ops were ~15% of an update. Already-fused
    tanh-GELUs (``nn.GELU(approximate="tanh")``, ``GELUTanh``) are replaced too, for the
    faster CPU forward.

    Only the module objects change: the saved ``config.json`` still names the original
    activation, and the weights are untouched, so a saved model loads and computes the same
    anywhere. Returns the number of modules replaced (0 on a second call).
    """
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    def tanh_gelu(m: nn.Module) -> bool:
        return (isinstance(m, (NewGELUActivation, FastGELUActivation, GELUTanh))
                or (type(m) is nn.GELU and m.approximate == "tanh"))

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if tanh_gelu(child):
                setattr(parent, name, TanhGELU())
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
