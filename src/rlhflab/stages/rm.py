"""Reward model: Bradley-Terry on preference pairs (Huang et al. 2024, RM stage).

``rlhflab rm --config default`` runs :func:`main`, which reads top to bottom:

1. run folder: a finished stage (``rm/reward/`` + ``rm/metrics.json``) is skipped; an
   unfinished one with a checkpoint needs ``--resume``;
2. data: preference train/validation pairs as *texts* -- the Huang-truncated query string
   (truncated with the policy tokenizer, the query PPO will show the policy) and
   ``" {summary}"`` -- so the RM reads them through its own tokenizer and any backbone works;
   with ``rm.sft_pairs`` (tldr-synth) a share of the train posts is relabelled on pairs of the
   SFT policy's own samples (:func:`sft_pair_comparisons`);
3. backbone (``model.reward_backbone``): ``sft`` = the SFT policy (Huang's recipe), ``minilm``
   = the pretrained MiniLM-L6 encoder (another tokenizer), or any HF path; a fresh scalar
   head ~ N(0, 1/sqrt(d+1)) with bias 0, dropout off (Huang details, via ``build_reward_backbone``);
4. AdamW (eps 1e-5) + cosine schedule; resume from ``rm/state/``;
5. the loop: loss = -logsigmoid(r_chosen - r_rejected), averaged over the *global* batch;
   each pair's query runs once and chosen and rejected continue from its KV cache
   (``pair_scores``); each process takes its share of a seeded
   permutation, as in SFT; with ``rm.length_covariate`` the loss adds w*(words_c - words_r),
   one learned scalar that absorbs the labelers' length preference (models/length_covariate.py);
6. the reward bias: the mean raw score of SFT reference summaries on train posts, stored
   with the model so that ``raw - bias`` centres near 0 (Huang detail: reward normalisation);
7. validation: accuracy overall and by |length difference|, margin, and on tldr-synth the
   agreement with the gold judge, accuracy normalised by the Bayes accuracy, and the learned
   length bias;
8. outputs: ``rm/reward/`` (``AutoModelForSequenceClassification`` + tokenizer + bias),
   ``metrics.jsonl``, ``metrics.json``, ``eval_pairs.jsonl``, TensorBoard under ``tb/rm``;
9. on tldr-synth, the on-policy check (``rm.on_policy_prompts``): the saved RM against the gold
   judge on the SFT policy's own samples (``eval/on_policy/...``, :func:`on_policy_metrics`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from rlhflab.config import RunConfig, derive_batch, save_config
from rlhflab.data.formats import load_preference_data, reference_texts
from rlhflab.data.tldr import R_CNNDM, load_split, tokenize_sft
from rlhflab.errors import StageError
from rlhflab.models.card import write_model_card
from rlhflab.models.length_covariate import CONFIG_KEY as LENGTH_KEY, LengthCovariate, word_count_diff
from rlhflab.models.lora import apply_lora, lora_active, save_outputs
from rlhflab.models.policy import count_parameters, load_tokenizer, position_ids_from_mask
from rlhflab.models.reward import RewardModel, build_reward_backbone, is_decoder_rm, minilm_path
from rlhflab.parallel import make_engine, optimizer_params
from rlhflab.runtime import CheckpointManager, atomic_save_dir, progress, rng_state, seed_everything, write_json
from rlhflab.trackers import make_logger
from rlhflab.stages.common import (
    StopRequested,
    check_resume_config,
    ensure_data,
    global_batch_indices,
    load_train_state,
    restore_optimization,
    make_accelerator,
    make_scheduler,
    micro_batches,
    num_steps,
    policy_tokenizer,
    prepare_stage_dir,
    process_slice,
    sft_source,
    stage_dirs,
    stop_after_step,
    synth_stats,
    training_config,
)

log = logging.getLogger(__name__)

LENGTH_BUCKETS = ((0, 2), (3, 5), (6, 10), (11, None))  # |words(chosen) - words(rejected)|


def bt_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
            offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-pair Bradley-Terry loss -log sigmoid(r_chosen - r_rejected [+ offset]): [B], [B] -> [B].

    ``offset``: the length term w*(words_c - words_r) of ``rm.length_covariate`` (models/length_covariate.py)."""
    margin = chosen_scores - rejected_scores
    return -F.logsigmoid(margin if offset is None else margin + offset)


def backbone_source(cfg: RunConfig) -> str:
    """Where the RM backbone comes from: ``sft`` -> <run>/sft/policy, ``minilm`` -> the MiniLM package folder, else the path."""
    kind = cfg.model.reward_backbone
    if kind == "sft":
        path = cfg.run_dir / "sft" / "policy"
        if not (path / "config.json").is_file():
            raise StageError(f"model.reward_backbone=sft needs the SFT policy at {path}, which does not exist; "
                             "run `rlhflab sft` with the same config first, or set model.reward_backbone=minilm or an HF path")
        return str(path)
    if kind == "minilm":
        return str(minilm_path())
    return kind


def build_reward_model(cfg: RunConfig, seed: int) -> RewardModel:
    """A fresh RM (head re-initialised, bias 0) on the configured backbone, with the backbone's own tokenizer."""
    from transformers import AutoTokenizer

    source = backbone_source(cfg)
    model = build_reward_backbone(source, None, seed=seed)
    if is_decoder_rm(model):
        # Decoders read the score at the EOS appended to every response: pad must differ from EOS.
        tokenizer = load_tokenizer(source, padding_side="right")
        if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except Exception as e:
            raise StageError(f"cannot load the reward backbone's tokenizer from {source}: {e}") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    max_positions = getattr(model.config, "max_position_embeddings", None) or cfg.rm_max_length
    return RewardModel(model, tokenizer, bias=0.0, max_length=min(cfg.rm_max_length, max_positions))


def pair_scores(model, rm: RewardModel, queries: Sequence[str], chosen: Sequence[str], rejected: Sequence[str],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw scores of chosen and rejected, each pair's shared query computed once: [b], [b].

    Decoder RMs: the query (the longest common prefix of the pair's two rows, most of every
    row) runs once, left-padded, into a KV cache; the cache is repeated for the chosen and
    rejected rows and their right-padded suffixes continue from it, with the full attention
    mask and position ids that carry on from each prefix's length. Same tokens, positions and
    attention as :func:`pair_scores_concat` -- equal scores and gradients up to float rounding
    (tests/test_rm_prefix.py) -- at about half the compute. The cache is NOT detached:
    gradients flow through the query's keys and values into every layer.

    ``model`` is the (possibly DDP-wrapped) RM. The prefix pass runs on the unwrapped
    ``rm.model``; the suffix pass goes through ``model`` so DDP prepares its gradient
    reduction exactly once per forward-backward (the reduction hooks sit on the parameters
    and fire once per backward, after both passes' gradients are summed). HF's pooling at the
    last non-pad token of each suffix is the score at the appended EOS.

    Encoders (MiniLM), sliding-window/hybrid caches and batches with no shared prefix at all
    take :func:`pair_scores_concat`.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if not rm.decoder:
        return pair_scores_concat(model, rm, queries, chosen, rejected, device)
    cache = DynamicCache(config=rm.model.config)
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return pair_scores_concat(model, rm, queries, chosen, rejected, device)
    t = rm.encode_pairs(queries, chosen, rejected)
    if t.prefix_ids.shape[1] == 0:
        return pair_scores_concat(model, rm, queries, chosen, rejected, device)
    prefix_mask = t.prefix_mask.to(device)
    rm.model.base_model(input_ids=t.prefix_ids.to(device), attention_mask=prefix_mask.long(),
                        position_ids=position_ids_from_mask(prefix_mask), cache=cache, use_cache=True)
    cache.batch_repeat_interleave(2)  # rows (chosen_i, rejected_i) share pair i's prefix
    prefix_mask = prefix_mask.repeat_interleave(2, dim=0)
    suffix_mask = t.suffix_mask.to(device)
    # Each suffix token sits right after its row's real prefix tokens; pads repeat the last real position.
    position_ids = prefix_mask.long().sum(1, keepdim=True) + suffix_mask.long().cumsum(1) - 1
    scores = model(input_ids=t.suffix_ids.to(device), attention_mask=torch.cat([prefix_mask, suffix_mask], 1).long(),
                   position_ids=position_ids, cache=cache, use_cache=True).logits.squeeze(-1).float()
    return scores[0::2], scores[1::2]


def pair_scores_concat(model, rm: RewardModel, queries: Sequence[str], chosen: Sequence[str],
                       rejected: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw scores of chosen and rejected in ONE forward over full rows (query repeated): [b], [b].

    ``model`` is the (possibly DDP-wrapped) RM; calling it -- not its base model -- keeps
    DDP's gradient hooks. Rows are right-padded by ``rm.encode`` and the RM's pad id differs
    from EOS, so HF's pooling at the last non-pad token is the score at the appended EOS.
    """
    b = len(queries)
    ids, mask = rm.encode(list(queries) * 2, list(chosen) + list(rejected))
    scores = model(input_ids=ids.to(device), attention_mask=mask.long().to(device)).logits.squeeze(-1).float()
    return scores[:b], scores[b:]


def _words(text: str) -> int:
    return len(text.split())


def _lstsq_no_intercept(x1: torch.Tensor, x2: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Coefficients (a, b) of y ~ a*x1 + b*x2 (no intercept: swapping a pair flips every sign)."""
    X = torch.stack([x1, x2], 1).double()
    sol = torch.linalg.lstsq(X, y.double().unsqueeze(1)).solution.squeeze(1)
    return float(sol[0]), float(sol[1])


def evaluate_rm(rm: RewardModel, pairs: Sequence, cfg: RunConfig, batch_size: int = 64,
                length_w: Optional[float] = None) -> tuple[dict, list[dict]]:
    """Validation metrics of a reward model on preference examples (``PrefExample``s).

    Returns (metrics, rows). Metrics: ``eval/accuracy``, ``eval/loss``, ``eval/margin``
    (mean r_chosen - r_rejected), ``eval/accuracy_lendiff_<bucket>`` and ``..._n`` per
    |word-length difference| bucket; on tldr-synth also ``eval/gold_agreement`` (pairs where
    sign(r_a - r_b) = sign(G(a) - G(b)), gold ties excluded), ``data/bayes_accuracy``,
    ``eval/normalized_accuracy`` = (acc - 0.5)/(bayes - 0.5) (acc against the sampled labels, as
    the issue defines it) and its binomial standard error ``eval/normalized_accuracy_se``; ``eval/expected_accuracy`` = mean over pairs of the labelers' probability of
    agreeing with the RM's pick, and ``eval/expected_normalized_accuracy`` = (expected - 0.5)/(bayes on
    the same pairs - 0.5) -- the same quantity without label-sampling noise; the learned length bias as
    the coefficients of the regression r_a - r_b ~ gold_coef*(G(a)-G(b)) + length_coef*(len(a)-len(b))
    beside the labelers' own (1/tau, beta_len), and among near-equal-gold pairs
    (|G(a)-G(b)| < tldr_synth.NEAR_TIE_EPS, lengths differing) the fraction where the RM prefers the longer
    (``eval/prefers_longer_near_tie``) beside the labels' fraction (``data/labels_prefer_longer_near_tie``),
    and the RM's preference for faithful summaries over ones with an invented fact
    (:func:`faithfulness_metrics`, ``eval/faithful/...``).

    Every ``eval/`` metric above is of the reward ``r`` that PPO reads. ``length_w`` (the learned length
    term of ``rm.length_covariate``) adds ``eval/length_term/...``: accuracy, loss and (tldr-synth)
    normalised accuracies of the whole preference model r_c - r_r + w*(words_c - words_r), the
    model the labels were fit with, and ``rm/length_covariate_w`` = w.
    """
    queries = [p.query for p in pairs]
    chosen = [p.chosen for p in pairs]
    rejected = [p.rejected for p in pairs]
    was_training = rm.model.training
    rm.model.eval()
    r_c = rm.score_texts(queries, chosen, batch_size=batch_size, normalize=False).double()
    r_r = rm.score_texts(queries, rejected, batch_size=batch_size, normalize=False).double()
    rm.model.train(was_training)
    margin = r_c - r_r
    correct = (margin > 0).double()
    len_diff = torch.tensor([_words(c) - _words(r) for c, r in zip(chosen, rejected)], dtype=torch.float64)
    m: dict = {"eval/accuracy": correct.mean().item(), "eval/loss": bt_loss(r_c, r_r).mean().item(),
               "eval/margin": margin.mean().item(), "eval/pairs": len(pairs)}
    full_margin = None
    if length_w is not None:
        full_margin = margin + length_w * word_count_diff(chosen, rejected).double()
        m.update({"rm/length_covariate_w": float(length_w),
                  "eval/length_term/accuracy": (full_margin > 0).double().mean().item(),
                  "eval/length_term/loss": bt_loss(full_margin, torch.zeros_like(full_margin)).mean().item()})
    for lo, hi in LENGTH_BUCKETS:
        name = f"{lo}-{hi}" if hi is not None else f">{lo - 1}"
        sel = (len_diff.abs() >= lo) & ((len_diff.abs() <= hi) if hi is not None else True)
        m[f"eval/accuracy_lendiff_{name}"] = correct[sel].mean().item() if sel.any() else None
        m[f"eval/accuracy_lendiff_{name}_n"] = int(sel.sum())
    rows = [{"id": p.id, "score_chosen": float(a), "score_rejected": float(b), "words_chosen": _words(c),
             "words_rejected": _words(r)} for p, a, b, c, r in zip(pairs, r_c, r_r, chosen, rejected)]
    if cfg.data.task != "tldr-synth":
        return m, rows

    from rlhflab.data.tldr_synth import NEAR_TIE_EPS, labeler_prob
    from rlhflab.judges.gold import score_many

    posts = [p.post for p in pairs]
    s_c = score_many(posts, [c.strip() for c in chosen])
    s_r = score_many(posts, [r.strip() for r in rejected])
    g_c = torch.tensor([s.total for s in s_c], dtype=torch.float64)
    g_r = torch.tensor([s.total for s in s_r], dtype=torch.float64)
    gold_diff = g_c - g_r
    untied = gold_diff.abs() > 1e-9
    if untied.any():
        m["eval/gold_agreement"] = (torch.sign(margin[untied]) == torch.sign(gold_diff[untied])).double().mean().item()
        m["data/label_gold_agreement"] = (gold_diff[untied] > 0).double().mean().item()
    m.update(faithfulness_metrics(margin, s_c, s_r))
    bayes = synth_stats(cfg).get("bayes_accuracy")
    if bayes is not None:
        m["data/bayes_accuracy"] = float(bayes)
        if float(bayes) > 0.5:
            # The binomial standard error of a sampled-label accuracy, on the same normalised scale
            # (~0.034 at 4000 pairs): two RMs closer than ~2 of these are not told apart by the labels.
            for pre in ("eval/",) + (("eval/length_term/",) if full_margin is not None else ()):
                acc = m[f"{pre}accuracy"]
                m[f"{pre}normalized_accuracy"] = (acc - 0.5) / (float(bayes) - 0.5)
                m[f"{pre}normalized_accuracy_se"] = (acc * (1 - acc) / len(pairs)) ** 0.5 / (float(bayes) - 0.5)
    # The same accuracy without the labelers' coin flips: each pair counts the probability that the
    # simulated labelers agree with the RM's pick (data/tldr_synth.labeler_prob), so its ceiling on
    # these very pairs is the Bayes accuracy mean(max(p, 1-p)). Sampled-label accuracy on N pairs
    # has a standard error of sqrt(acc(1-acc)/N) (~0.007, ~0.03 normalised, at the default 4000);
    # this estimate has none from the labels, only from which pairs were drawn.
    tau, beta = cfg.data.synth.labeler_tau, cfg.data.synth.labeler_len_beta
    p_chosen = torch.tensor([labeler_prob(a, b, _words(c), _words(r), tau, beta) for a, b, c, r
                             in zip(g_c.tolist(), g_r.tolist(), chosen, rejected)], dtype=torch.float64)
    expected = torch.where(margin > 0, p_chosen, 1 - p_chosen).mean().item()
    bayes_here = torch.maximum(p_chosen, 1 - p_chosen).mean().item()
    m["eval/expected_accuracy"], m["data/bayes_accuracy_eval_pairs"] = expected, bayes_here
    if bayes_here > 0.5:
        m["eval/expected_normalized_accuracy"] = (expected - 0.5) / (bayes_here - 0.5)
        if full_margin is not None:
            expected_full = torch.where(full_margin > 0, p_chosen, 1 - p_chosen).mean().item()
            m["eval/length_term/expected_normalized_accuracy"] = (expected_full - 0.5) / (bayes_here - 0.5)
    gold_coef, length_coef = _lstsq_no_intercept(gold_diff, len_diff, margin)
    m.update({"eval/gold_coef": gold_coef, "eval/length_coef": length_coef,
              "data/labeler_gold_coef": 1.0 / tau, "data/labeler_length_coef": beta})
    # Same definition of 'equal gold' as the generator's stats.json (length_bias.longer_chosen_rate).
    near = (gold_diff.abs() < NEAR_TIE_EPS) & (len_diff != 0)
    m["eval/near_tie_pairs"] = int(near.sum())
    if near.any():
        longer_is_chosen = len_diff[near] > 0
        rm_prefers_chosen = margin[near] > 0
        m["eval/prefers_longer_near_tie"] = (rm_prefers_chosen == longer_is_chosen).double().mean().item()
        m["data/labels_prefer_longer_near_tie"] = longer_is_chosen.double().mean().item()
    for row, a, b in zip(rows, g_c.tolist(), g_r.tolist()):
        row["gold_chosen"], row["gold_rejected"] = a, b
    return m, rows


def faithfulness_metrics(margin: torch.Tensor, gold_chosen: Sequence, gold_rejected: Sequence) -> dict:
    """The RM's blind spot for invented facts (tldr-synth): among validation pairs where exactly one
    summary states something the post does not (``GoldScore.hallucinated`` > 0: a wrong person,
    ask, detail or number), how often the RM, the sampled labels and the gold judge prefer the
    faithful one. ``.../ask/...`` is the same on pairs where exactly one summary asks a question the
    post does not (an invented ``ask:`` fact), the cheapest invention for PPO: appending "Should I
    quit?" lengthens a summary and adds an ask-shaped sentence whether or not the post asked it.

    Keys (``None`` when no such pair exists): ``eval/faithful/{pairs, rm_prefers_faithful,
    labels_prefer_faithful, gold_prefers_faithful}`` and ``eval/faithful/ask/...``. Gold ties count
    half. An RM whose ``rm_prefers_faithful`` is far below the labels' rate has learned "more
    content scores higher" without checking it against the post, and PPO can buy RM score with
    invented asks (a measured case: RESULTS.md, issue 11).
    """
    m: dict = {}
    margin = margin.tolist()
    kinds = (("eval/faithful/", lambda s: s.hallucinated > 0),
             ("eval/faithful/ask/", lambda s: any(f.startswith("ask:") for f in s.hallucinated_facts)))
    for pre, invents in kinds:
        n = rm_f = lab_f = gold_f = 0.0
        for mg, c, r in zip(margin, gold_chosen, gold_rejected):
            ic, ir = invents(c), invents(r)
            if ic == ir:
                continue
            faithful_is_chosen = ir  # the rejected one invents, so the chosen one is faithful
            n += 1
            lab_f += faithful_is_chosen
            rm_f += (mg > 0) == faithful_is_chosen
            gold_f += 0.5 if c.total == r.total else float((c.total > r.total) == faithful_is_chosen)
        m[f"{pre}pairs"] = int(n)
        for key, v in (("rm_prefers_faithful", rm_f), ("labels_prefer_faithful", lab_f), ("gold_prefers_faithful", gold_f)):
            m[f"{pre}{key}"] = v / n if n else None
    return m


def sft_pair_comparisons(cfg: RunConfig, stage_dir: Path, train: list, policy_tok, is_main: bool) -> tuple[list, dict]:
    """Step 2b (``rm.sft_pairs`` > 0, tldr-synth): the train comparisons with a share of the posts
    relabelled on pairs of the SFT policy's own samples (:mod:`rlhflab.data.sft_pairs`).

    The main process samples and writes ``rm/sft_pairs.jsonl`` with its settings and counts in
    ``rm/sft_pairs.json``; a rerun or a resume with the same settings reads them back instead of
    sampling again. Other processes call this after a barrier and only read.
    """
    from rlhflab.data.sft_pairs import relabel
    from rlhflab.data.tldr import load_preferences
    from rlhflab.models.policy import load_policy
    from rlhflab.stages.common import preference_source

    r = cfg.rm
    path, meta = stage_dir / "sft_pairs.jsonl", stage_dir / "sft_pairs.json"
    sft_dir = Path(cfg.run_dir) / "sft" / "policy"
    key = {"fraction": r.sft_pairs, "seed": r.seed, "temperature": cfg.ppo.temperature,
           "response_length": cfg.response_length, "stop_token": cfg.ppo.stop_token, "policy": str(sft_dir),
           "labeler_tau": cfg.data.synth.labeler_tau, "labeler_len_beta": cfg.data.synth.labeler_len_beta}
    have = json.loads(meta.read_text()) if meta.is_file() and path.is_file() else {}
    if have.get("key") != key:
        if not is_main:
            raise StageError(f"rm: {path} is missing after the main process wrote it")
        if not (sft_dir / "config.json").is_file():
            raise StageError(f"rm.sft_pairs={r.sft_pairs} samples the SFT policy, but there is none at {sft_dir} "
                             "(run `rlhflab sft` with the same config first)")
        rows, label = load_split(preference_source(cfg), "train", "preference", skip_bad_rows=cfg.data.skip_bad_rows)
        if len(rows) != len(train):
            raise StageError(f"rm.sft_pairs: {label} has {len(rows)} rows but {len(train)} were usable; relabelling "
                             "needs every train row to load (fix the bad rows or set rm.sft_pairs=0)")
        t0 = time.time()
        policy = load_policy(sft_dir).to(make_accelerator().device).eval()
        bar = progress(0, "rm: SFT-sample pairs", unit="sample")  # relabel sets the total
        new, counts = relabel(rows, train, policy, policy_tok, r.sft_pairs, r.seed, cfg.response_length,
                              cfg.ppo.temperature, cfg.ppo.stop_token == "eos", cfg.data.synth.labeler_tau,
                              cfg.data.synth.labeler_len_beta, bar=bar)
        bar.close()
        del policy
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for row in new:
                f.write(json.dumps(row) + "\n")
        tmp.replace(path)
        write_json(meta, {"key": key, "counts": {**counts, "wall_s": round(time.time() - t0, 1)}})
        have = json.loads(meta.read_text())
    examples, _ = load_preferences(str(path), "train", policy_tok, cfg.data.max_query_length, cfg.data.response_length,
                                   False, cfg.pref_response_length)
    return examples, have["counts"]


def on_policy_metrics(cfg: RunConfig, rm_dir: Path) -> dict:
    """Step 9: ``eval/on_policy/...`` of :func:`rlhflab.stages.overopt.on_policy_check` for the saved
    RM, or {} when off (``rm.on_policy_prompts: 0``), not tldr-synth (no gold judge), or with no
    SFT policy in the run (another ``model.reward_backbone`` without ``rlhflab sft``: logged)."""
    r = cfg.rm
    if cfg.data.task != "tldr-synth" or r.on_policy_prompts == 0:
        return {}
    sft_dir = Path(cfg.run_dir) / "sft" / "policy"
    if not (sft_dir / "config.json").is_file():
        log.warning("rm: on-policy check skipped: no SFT policy at %s (run `rlhflab sft` first)", sft_dir)
        return {}
    from rlhflab.stages.overopt import on_policy_check

    return on_policy_check(cfg, sft_dir, rm_dir, r.on_policy_prompts, r.on_policy_samples)


def reference_bias(rm: RewardModel, cfg: RunConfig, tokenizer, n: int = 256, batch_size: int = 64) -> float:
    """Mean raw score of (query, " {reference summary}") over the first ``n`` SFT train posts
    (data.task=standard: SFT completions, else chosen responses, ``data.formats.reference_texts``)."""
    if cfg.data.task == "standard":
        queries, responses, label = reference_texts(cfg, tokenizer, n)
    else:
        rows, label = load_split(sft_source(cfg), "train", "sft", skip_bad_rows=True)
        examples, _ = tokenize_sft(rows[: 2 * n], tokenizer, cfg.data.max_query_length, cfg.data.response_length,
                                   label, skip_bad_rows=True)
        queries, responses = [e.query for e in examples[:n]], [e.response for e in examples[:n]]
    if not queries:
        raise StageError(f"{label}: no usable SFT reference summaries to compute the reward bias from")
    was_training = rm.model.training
    rm.model.eval()
    scores = rm.score_texts(queries, responses, batch_size=batch_size, normalize=False)
    rm.model.train(was_training)
    return float(scores.double().mean())


def main(cfg: RunConfig, resume: bool = False, force: bool = False, bias_samples: int = 256) -> dict:
    """Train (or resume) the reward model; returns the final metrics (also ``<run>/rm/metrics.json``).

    ``resume``/``force`` as in :func:`rlhflab.stages.sft.main`. ``bias_samples``: SFT train
    posts whose reference summaries set the reward bias.
    """
    t_start = time.time()
    r = cfg.rm
    # 1. Accelerator and run folder. ------------------------------------------------------
    accelerator = make_accelerator()
    engine = make_engine(cfg, accelerator)  # sharding, precision, checkpoints (rlhflab.parallel)
    is_main = accelerator.is_main_process
    stage_dir, tb_dir = stage_dirs(cfg, "rm")
    done = prepare_stage_dir(stage_dir, "reward", resume=resume, force=force, is_main=is_main)
    if done is not None:
        return done
    accelerator.wait_for_everyone()
    sizes = derive_batch("rm", r.batch_size, r.micro_batch_size, accelerator.num_processes)
    source = backbone_source(cfg)  # fails early (before loading data) when the SFT policy is missing
    if is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg.run_dir / "config.yaml")

    # 2. Data as texts: queries truncated with the policy tokenizer (what PPO will show). ------
    ensure_data(cfg, progress=is_main)
    policy_tok = policy_tokenizer(cfg)
    train, train_skips = load_preference_data(cfg, "train", policy_tok)  # data.task dispatch: TL;DR or TRL formats
    val, val_skips = load_preference_data(cfg, "validation", policy_tok)
    sft_pairs_info: dict = {}
    if r.sft_pairs:  # tldr-synth: part of the train comparisons between the SFT policy's own samples
        if is_main:
            train, sft_pairs_info = sft_pair_comparisons(cfg, stage_dir, train, policy_tok, is_main)
        accelerator.wait_for_everyone()
        if not is_main:
            train, sft_pairs_info = sft_pair_comparisons(cfg, stage_dir, train, policy_tok, is_main)
    total_steps = num_steps(len(train), r.batch_size, r.epochs)
    if total_steps < 1:
        raise StageError(f"rm: {len(train)} usable train comparisons x rm.epochs={r.epochs} is less than one batch "
                         f"(rm.batch_size={r.batch_size})")

    # 3. Backbone with a fresh head N(0, 1/sqrt(d+1)), bias 0, dropout off. -------------------
    seed_everything(r.seed)
    rm = build_reward_model(cfg, seed=r.seed)
    n_params = count_parameters(rm.model)
    if lora_active(cfg.model.lora, "rm"):  # adapters + the score head train (model.lora)
        rm.model = apply_lora(rm.model, cfg.model.lora, "seq_cls", base_path=source)

    # 4. dtype/checkpointing/FSDP2 units (engine.prepare), optimizer, schedule, resume. ----------
    if lora_active(cfg.model.lora, "rm") and engine.wrapped:
        raise StageError("model.lora with several processes is not supported yet (peft adapters are not wired "
                         "into the FSDP2 engine); run LoRA on one process")
    model = rm.model = engine.prepare(rm.model)
    optimizer = engine.optimizer([q for q in rm.model.parameters() if q.requires_grad], r.optim)
    scheduler = make_scheduler(optimizer, "cosine", total_steps, r.optim.warmup_ratio)
    length_optim = r.optim if r.length_covariate_lr is None else r.optim.model_copy(update={"lr": r.length_covariate_lr})
    length_term = (LengthCovariate(length_optim, total_steps, r.optim.warmup_ratio, accelerator.device)
                   if r.length_covariate else None)
    ckpts = CheckpointManager(stage_dir / "state")

    def length_w() -> Optional[float]:
        return None if length_term is None else length_term.value

    latest = ckpts.latest() if resume else None
    start_step, elapsed_before = 0, 0.0
    if latest is not None:
        check_resume_config(load_train_state(latest).get("config"), cfg, "rm", latest)
        state = engine.load_checkpoint(latest, {"model": rm.model}, optimizer)
        start_step, elapsed_before = restore_optimization(state, optimizer, scheduler)
        if length_term is not None:
            length_term.load_state_dict(state["length_covariate"])
        del state
    # The KV-cached prefix pass of pair_scores is lost under gradient checkpointing (transformers drops
    # the cache in training mode), and FSDP2 cannot replay it in the backward (the gradient reaches the
    # prefix blocks only through the cache, never through an output its pre-backward hook sees, so their
    # params are already resharded): score full rows instead -- the same scores, ~2x the RM compute.
    score_pairs = pair_scores_concat if cfg.parallel.gradient_checkpointing or engine.wrapped else pair_scores

    logger = make_logger(cfg, "rm", stage_dir, tb_dir, enabled=is_main, resume_step=start_step if start_step else None)
    stop_at = stop_after_step()
    device = accelerator.device
    bar = progress(total_steps, "rm", enabled=is_main)
    bar.update(start_step)
    last: dict = {}

    # 5. Bradley-Terry loop. ---------------------------------------------------------------------
    model.train()
    for step in range(start_step + 1, total_steps + 1):
        t0 = time.time()
        global_ids = global_batch_indices(len(train), r.batch_size, r.epochs, r.seed, step - 1)
        local = process_slice([train[i] for i in global_ids], accelerator.process_index, accelerator.num_processes)
        chunks = micro_batches(local, r.micro_batch_size)
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.float64)
        margin_sum = torch.zeros((), device=device, dtype=torch.float64)
        for k, chunk in enumerate(chunks):
            with engine.gradient_sync(model, sync=k == len(chunks) - 1):
                with engine.autocast():
                    r_c, r_r = score_pairs(model, rm, [p.query for p in chunk], [p.chosen for p in chunk],
                                           [p.rejected for p in chunk], device)
                    offset = None if length_term is None else length_term.offset(
                        [p.chosen for p in chunk], [p.rejected for p in chunk])
                    loss = bt_loss(r_c.float(), r_r.float(), offset).sum()
                # Mean over the GLOBAL batch; the average over processes is undone by x num_processes.
                accelerator.backward(loss * (accelerator.num_processes / r.batch_size))
            loss_sum += loss.detach().double()
            correct += (r_c > r_r).sum().double()
            margin_sum += (r_c - r_r).detach().sum().double()
        grad_norm = None
        if r.optim.max_grad_norm > 0:
            grad_norm = engine.clip_grad_norm_(optimizer_params(optimizer), r.optim.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if length_term is not None:  # w: its own AdamW, outside the model's clipping (one scalar)
            length_term.step(accelerator.num_processes)

        totals = accelerator.reduce(torch.stack([loss_sum, correct, margin_sum]), "sum") / r.batch_size
        last = {"train/loss": totals[0].item(), "train/accuracy": totals[1].item(), "train/margin": totals[2].item(),
                "lr": lr, "epoch": step * r.batch_size / len(train),
                "perf/pairs_per_s": r.batch_size / max(time.time() - t0, 1e-9)}
        if grad_norm is not None:
            last["train/grad_norm"] = float(grad_norm)
        if length_term is not None:
            last["train/length_covariate_w"] = length_term.value
        if step % r.log_every == 0 or step == total_steps:
            logger.log(step, last)
        bar.update(1)
        bar.set_postfix(loss=f"{last['train/loss']:.3f}", acc=f"{last['train/accuracy']:.2f}")

        if r.eval_every and step % r.eval_every == 0 and step < total_steps:
            if is_main or engine.wrapped:  # a wrapped model's forward needs every process
                logger.log(step, evaluate_rm(rm, val, cfg, batch_size=2 * r.micro_batch_size, length_w=length_w())[0])
            accelerator.wait_for_everyone()

        stopping = stop_at is not None and step >= stop_at
        if (r.save_every and step % r.save_every == 0) or step == total_steps or stopping:
            engine.save_checkpoint(ckpts, step, {"model": rm.model}, optimizer,
                                   {"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(),
                                    "elapsed_s": elapsed_before + time.time() - t_start,
                                    "config": training_config(cfg, "rm"),
                                    **({} if length_term is None else {"length_covariate": length_term.state_dict()})})
        if stopping and step < total_steps:
            bar.close()
            logger.close()
            raise StopRequested(f"rm stopped after step {step} (RLHFLAB_STOP_AFTER_STEP); continue with --resume")
    bar.close()

    # 6. Reward bias, 7. validation, 8. outputs (written by the main process; every process takes
    #    part in a wrapped model's forwards and in gathering its full weights). ---------------------
    result: dict = {}
    if is_main or engine.wrapped:
        rm.bias = reference_bias(rm, cfg, policy_tok, n=bias_samples, batch_size=2 * r.micro_batch_size)
        metrics, rows = evaluate_rm(rm, val, cfg, batch_size=2 * r.micro_batch_size, length_w=length_w())
    if length_term is not None:  # recorded with the model for the reader; scoring never uses it
        rm.model.config.update({LENGTH_KEY: length_term.value})
    if is_main:
        logger.log(total_steps, metrics)
    logger.close()
    n_trainable = sum(q.numel() for q in rm.model.parameters() if q.requires_grad)
    outputs: dict = {}
    if lora_active(cfg.model.lora, "rm"):  # rm/reward (with its bias; merged) and rm/reward_adapter
        if is_main:
            outputs = save_outputs(rm.model, rm.tokenizer, stage_dir, "reward", cfg.model.lora, atomic_save_dir,
                                   save_merged=rm.save)
    else:
        def write_reward(tmp: Path, state_dict: Optional[dict]) -> None:
            rm.save(tmp, state_dict=state_dict)
            if is_main:
                write_model_card(tmp, cfg, "rm", {**metrics, "rm/bias": rm.bias}, base_model=source)

        engine.save_final(stage_dir / "reward", rm.model, write_reward)
    if is_main:
        with open(stage_dir / "eval_pairs.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        result = {
            "step": total_steps, **{k: v for k, v in last.items() if k != "perf/pairs_per_s"}, **metrics,
            "rm/bias": rm.bias, "rm/backbone": cfg.model.reward_backbone, "rm/backbone_source": source,
            "data/train_pairs": len(train), "data/validation_pairs": len(val),
            "data/train_skipped": train_skips.total, "data/validation_skipped": val_skips.total,
            "data/skip_reasons": {"train": dict(train_skips.counts), "validation": dict(val_skips.counts)},
            # CNN/DM comparisons of the real validation split: left out of TL;DR RM data, counted (SFD).
            "data/cnndm_rows_skipped": train_skips.filtered[R_CNNDM] + val_skips.filtered[R_CNNDM],
            "data/max_pref_response_length": cfg.pref_response_length,
            **{f"data/sft_pairs/{k}": v for k, v in sft_pairs_info.items()},
            "model/parameters": n_params, "num_processes": accelerator.num_processes,
            "batch/grad_accum": sizes.grad_accum, "time/wall_s": round(elapsed_before + time.time() - t_start, 2),
            "reward_dir": str(stage_dir / "reward"), "lora": lora_active(cfg.model.lora, "rm"), **outputs,
            "model/trainable_parameters": n_trainable,
        }
        result.update(on_policy_metrics(cfg, stage_dir / "reward"))
        write_json(stage_dir / "metrics.json", result)  # last: its presence marks the stage finished
    accelerator.wait_for_everyone()
    if not is_main:
        result = json.loads((stage_dir / "metrics.json").read_text())
    return result
