"""Evaluation stage: summarise held-out posts with each policy and judge the summaries.

Reads top to bottom as numbered steps:

1. pick the policies (``<run>/sft/policy`` and ``<run>/ppo/policy`` when present, plus any
   HF directories passed in) and the first ``eval.n_prompts`` posts of the ``eval.split``
   SFT split, with Huang's query format and truncation (``rlhflab.data.tldr``);
2. generate one summary per post and policy, near-greedy (``eval.temperature``, Huang's
   0.01), ``data.response_length`` tokens at most, the same seed for every policy;
3. per policy: ROUGE-L (F1, ``rouge-score`` with stemming) against the reference summary,
   the reward model's normalised score (``raw - bias``) and its histogram, the policy's
   mean token entropy, response lengths, and the reward-hacking signals of
   :mod:`rlhflab.evaluation.signals`;
4. judges: on tldr-synth the gold judge (known answer) gives each policy's mean gold score
   with a bootstrap 95% CI and the pairwise win rates (vs the references and vs every
   other policy) with bootstrap CIs and a length-controlled win rate; the reward model is
   also reported as a (proxy) judge; an OpenAI-compatible LLM judge runs the same
   comparisons when ``eval.llm_judge.base_url`` is set, and its agreement with the gold
   judge is reported;
5. write ``<run>/eval/results.json``, ``<run>/eval/samples.jsonl`` and
   ``<run>/eval/metrics.json``.

``results.json`` schema (stable; ``null`` where a number is undefined, e.g. no RM):

.. code-block:: text

    {
      "meta": {split, n_prompts, n_prompts_requested, temperature, response_length, seed,
               bootstrap, policies: {name: path}, reward_model: path|null, judges: [...],
               entropy_definition, lc_method, comparison_order, skipped_rows},
      "policies": {name: {
          "path", "n",
          "rougeL": mean F1, "rougeL_ci": [lo, hi],
          "rm_score_mean": mean normalised RM score | null, "rm_score_ci": [lo, hi] | null,
          "rm_score_std", "rm_histogram": {"edges": [k+1], "counts": [k]} | null,
          "gold_mean": mean | null, "gold_ci": [lo, hi] | null,
          "entropy": mean over samples of the mean token entropy (nats),
          "length_tokens": {mean, median, std, min, max}, "length_words": {...},
          "no_eos_rate", "rm_gold_corr", "length_gold_corr",
          "gold_coverage_mean": mean key-fact coverage | null,
          "gold_hallucination_rate": share of summaries with an invented fact or number | null}},
      "reference": {the same keys where defined: rm_score_mean, gold_mean, length_words, ...; rougeL = 1},
      "comparisons": [{"a", "b", "judge": "gold"|"rm"|"llm", "win_rate", "ci": [lo, hi],
                       "lc_win_rate", "lc_ci": [lo, hi], "length_slope", "wins", "losses",
                       "ties", "n"}],
      "signals": {name: {"hack/title_copy_rate", "hack/prompt_copy_rate",
                         "hack/repetition_rate", "hack/no_eos_rate",
                         "hack/length_score_corr", "hack/distinct_2"}},   # incl. "reference"
      "judges_agreement": {"<a> vs <b>": {judge/agreement, judge/kappa, ...}, "all": {...}} | null
    }

Runs in one process on one device (CUDA when available, else CPU); no accelerate.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from rlhflab.config import RunConfig, save_config
from rlhflab.errors import StageError
from rlhflab.runtime import progress, seed_everything, write_json

log = logging.getLogger(__name__)

ENTROPY_DEFINITION = (
    "per sample: mean over the generated response tokens (EOS included) of the entropy in nats of the "
    "policy's next-token distribution at temperature 1 (not the near-greedy sampling temperature), "
    "conditioned on the query and the response so far; reported: the mean over samples")
LC_METHOD = (
    "logistic regression of the outcome (1 win, 0 loss, 0.5 tie) on log(len_a/len_b), lengths in words "
    "(floored at 1), predicted at equal length: sigmoid(intercept) (AlpacaEval-LC style, Dubois et al. 2024); "
    "rlhflab.evaluation.stats.length_controlled_win_rate")
COMPARISON_ORDER = ("pairs are (a, b) with a the policy listed later (e.g. 'ppo' vs 'sft'), and every policy vs "
                    "'reference'; win_rate is a's: 1 win, 0 loss, 0.5 tie, per post")
HIST_BINS = 20


# ------------------------------------------------------------------------------ helpers
def _clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars -> Python, nan/inf -> null (json.dump would write NaN)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _stats(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "median": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std()),
            "min": float(v.min()), "max": float(v.max())}


def _outcomes(score_a: Sequence[float], score_b: Sequence[float]) -> np.ndarray:
    """Per-post outcome of a vs b: 1 if a scored higher, 0 if lower, 0.5 on a tie. [n]"""
    a, b = np.asarray(score_a, dtype=np.float64), np.asarray(score_b, dtype=np.float64)
    return np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5))


def default_policies(run_dir: Path) -> dict[str, str]:
    """``{"sft": <run>/sft/policy, "ppo": <run>/ppo/policy}``, keeping those that exist."""
    out = {}
    for name in ("sft", "ppo"):
        p = Path(run_dir) / name / "policy"
        if (p / "config.json").exists():
            out[name] = str(p)
    return out


def _load_policy_and_tokenizer(name: str, path: str, cfg: RunConfig, device: torch.device):
    from rlhflab.models.policy import ensure_embeddings_fit, load_policy, load_tokenizer
    from rlhflab.stages.common import data_root

    # the policy's own tokenizer first (stages save it beside the weights), then the configured one
    candidates = [path] + [p for p in (cfg.model.tokenizer,
                                       str(data_root(cfg) / "tokenizer") if cfg.data.task == "tldr-synth" else None) if p]
    tok, errors = None, []
    for c in candidates:
        try:
            tok = load_tokenizer(c, padding_side="left")
            break
        except StageError as e:
            errors.append(str(e))
    if tok is None:
        raise StageError(f"policy '{name}' ({path}): no tokenizer found; tried " + "; ".join(errors))
    model = load_policy(path).to(device)
    ensure_embeddings_fit(model, tok)
    model.eval()
    return model, tok


@torch.no_grad()
def response_entropy(model, query_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                     pad_token_id: int, batch_size: int = 8) -> list[float]:
    """Mean token entropy (nats, temperature 1) of each response under ``model``.

    Args:
        query_ids: n unpadded query token lists; response_ids: n response token lists
            (EOS included when present).
    Returns:
        n floats; nan for an empty response. Each batch is [b, Tq + R]: queries left-padded,
        responses right-padded, positions that skip the left padding (``forward_logits``).
    """
    from rlhflab.algos.logprobs import entropy_from_logits
    from rlhflab.data.collate import pad_left, pad_right
    from rlhflab.models.policy import forward_logits

    device = next(model.parameters()).device
    out: list[float] = []
    for i in range(0, len(query_ids), batch_size):
        q = [list(x) for x in query_ids[i: i + batch_size]]
        r = [list(x) for x in response_ids[i: i + batch_size]]
        if max(len(x) for x in r) == 0:
            out.extend([float("nan")] * len(r))
            continue
        q_ids, q_mask = pad_left(q, pad_token_id)
        r_ids, r_mask = pad_right(r, pad_token_id)
        ids = torch.cat([q_ids, r_ids], 1).to(device)
        mask = torch.cat([q_mask, r_mask], 1).to(device)
        Tq, R = q_ids.shape[1], r_ids.shape[1]
        logits = forward_logits(model, ids, mask)[:, Tq - 1: Tq + R - 1]  # [b, R, V]: predicts response token t
        ent = entropy_from_logits(logits, 1.0).cpu()  # [b, R]
        m = r_mask.float()
        per = (ent * m).sum(1) / m.sum(1).clamp(min=1)
        out.extend(float(e) if n > 0 else float("nan") for e, n in zip(per.tolist(), m.sum(1).tolist()))
    return out


def _gold_scores(posts: Sequence[str], summaries: Sequence[str]) -> list:
    """Gold judge scores (tldr-synth): ``rlhflab.judges.gold.score_many`` -> list of ``GoldScore``."""
    from rlhflab.judges.gold import score_many

    return score_many(list(posts), list(summaries))


def _compare(a: str, b: str, judge: str, outcomes: np.ndarray, len_a: Sequence[float], len_b: Sequence[float],
             n_boot: int, seed: int) -> dict:
    from rlhflab.evaluation.stats import bootstrap_ci, length_controlled_ci, length_controlled_win_rate

    wr, lo, hi = bootstrap_ci(outcomes, n_boot=n_boot, seed=seed)
    la = np.maximum(np.asarray(len_a, dtype=np.float64), 1.0)
    lb = np.maximum(np.asarray(len_b, dtype=np.float64), 1.0)
    lc = length_controlled_win_rate(outcomes, la, lb)
    _, lc_lo, lc_hi = length_controlled_ci(outcomes, la, lb, n_boot=n_boot, seed=seed)
    return {"a": a, "b": b, "judge": judge, "win_rate": wr, "ci": [lo, hi], "lc_win_rate": lc.lc_win_rate,
            "lc_ci": [lc_lo, lc_hi], "length_slope": lc.slope, "wins": int((outcomes == 1).sum()),
            "losses": int((outcomes == 0).sum()), "ties": int((outcomes == 0.5).sum()), "n": int(outcomes.size)}


def _eval_reward(cfg: RunConfig, reward_path: Optional[str], device: torch.device) -> tuple[Any, Any]:
    """The 'rm' judge: ``reward_path``, else ``reward.sources`` when they are not the default
    (functions, remote RMs, the gold judge: :func:`rlhflab.rewards.build_reward`), else the trained
    RM at ``model.reward_model`` or ``<run>/rm/reward``. Returns (reward or None, what it is)."""
    from rlhflab.models.reward import RewardModel
    from rlhflab.models.sources import reward_model_dir
    from rlhflab.rewards import Reward, build_reward

    if reward_path:
        return RewardModel.from_pretrained(reward_path, device=device), reward_path
    default = RunConfig().reward
    # (empty sources: a Python-API PPO run whose reward lived in memory -> the run's RM, as by default)
    if cfg.reward.sources and cfg.reward != default or cfg.model.reward_model:
        reward = build_reward(cfg, device)
        return reward, ", ".join(reward.names) if isinstance(reward, Reward) else str(reward_model_dir(cfg))
    rm_dir = Path(cfg.run_dir) / "rm" / "reward"
    if (rm_dir / "config.json").exists():
        return RewardModel.from_pretrained(rm_dir, device=device), rm_dir
    log.warning("no reward model at %s: RM scores are left out", rm_dir)
    return None, rm_dir


def policy_names(specs: Sequence[str]) -> dict[str, str]:
    """``--policy`` values (``DIR`` or ``NAME=DIR``) -> {name: DIR}. A bare DIR is named after its
    folder (``runs/x/ppo/policy`` -> ``ppo``: a folder called ``policy`` takes its parent's name);
    repeated names get ``-2``, ``-3``, ..."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path = spec
            p = Path(spec.rstrip("/"))
            name = p.parent.name if p.name == "policy" and p.parent.name else p.name
        if not name or not path:
            raise StageError(f"--policy {spec!r}: expected DIR or NAME=DIR")
        base, k = name, 1
        while name in out:
            k += 1
            name = f"{base}-{k}"
        out[name] = path
    return out


# --------------------------------------------------------------------------------- main
def main(cfg: RunConfig, policies: Optional[dict[str, str]] = None, include_defaults: bool = True,
         reward_path: Optional[str] = None, batch_size: Optional[int] = None, resume: bool = False) -> dict:
    """Evaluate policies on ``cfg.eval.n_prompts`` posts; write ``<run>/eval/``; return metrics.json's dict.

    Args:
        cfg: the run config (``eval``, ``data`` sections; ``run_dir`` for inputs/outputs).
        policies: extra ``{name: HF model directory}`` to evaluate, added to (or, on a name
            clash, replacing) the run's own ``sft``/``ppo`` policies.
        include_defaults: also evaluate ``<run>/sft/policy`` and ``<run>/ppo/policy`` when present.
        reward_path: reward model directory (default ``<run>/rm/reward``; RM metrics are
            left out with a note when it does not exist).
        batch_size: generation and scoring batch (default ``cfg.eval.batch_size``).
        resume: accepted for symmetry with the training stages and ignored: evaluation keeps no
            state and simply reruns (the LLM judge's cache makes a rerun cheap).
    """
    from rlhflab.data.errors import DataError
    from rlhflab.data.tldr import build_query_ids, load_split, tokenize_sft
    from rlhflab.evaluation.signals import summarize_signals, words
    from rlhflab.evaluation.stats import bootstrap_ci, judge_agreement, pearson
    from rlhflab.models.generation import generate_texts
    from rlhflab.rewards import score as score_rewards

    ev = cfg.eval
    batch_size = batch_size or ev.batch_size
    run_dir = Path(cfg.run_dir)
    out_dir = run_dir / "eval"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # 1. policies and posts -------------------------------------------------------------
    chosen: dict[str, str] = default_policies(run_dir) if include_defaults else {}
    for name, path in (policies or {}).items():
        if name == "reference":
            raise StageError("policy name 'reference' is reserved for the reference summaries; pick another name")
        if not (Path(path) / "config.json").exists():
            raise StageError(f"policy '{name}': no HF model directory at {path} (expected config.json)")
        chosen[name] = str(path)
    if not chosen:
        raise StageError(f"no policy to evaluate: neither {run_dir / 'sft' / 'policy'} nor {run_dir / 'ppo' / 'policy'} "
                         "exists; run `rlhflab sft` (and `rlhflab ppo`) first, or pass policy directories")
    names = list(chosen)

    from rlhflab.stages.common import sft_source

    source = sft_source(cfg)
    standard = cfg.data.task == "standard"  # TRL formats: references = the completions; no gold judge, no titles
    try:
        if standard:
            from rlhflab.data.formats import load_sft_data

            first_model, first_tok = _load_policy_and_tokenizer(names[0], chosen[names[0]], cfg, device)
            examples, skipped = load_sft_data(cfg, ev.split, first_tok)
            label = skipped.file
        else:
            rows, label = load_split(source, ev.split, "sft", skip_bad_rows=cfg.data.skip_bad_rows)
            first_model, first_tok = _load_policy_and_tokenizer(names[0], chosen[names[0]], cfg, device)
            examples, skipped = tokenize_sft(rows, first_tok, cfg.data.max_query_length, cfg.data.response_length,
                                             label, skip_bad_rows=cfg.data.skip_bad_rows)
    except DataError as e:
        hint = (" (evaluation reads the SFT dataset's eval.split and needs reference completions: "
                "prompt+completion or messages)") if standard else ""
        raise StageError(f"evaluation data: {e}{hint}") from None
    if not examples:
        raise StageError(f"{label}: no usable posts in the '{ev.split}' split")
    n = min(ev.n_prompts, len(examples))
    if n < ev.n_prompts:
        log.warning("eval.n_prompts=%d but %s has %d usable posts: evaluating %d", ev.n_prompts, label, len(examples), n)
    examples = examples[:n]  # the first n posts in file order: the same posts for every policy
    posts = [e.post for e in examples]
    titles = None if standard else [e.title for e in examples]
    queries = [e.query for e in examples]  # query text as the RM reads it (truncated post)
    references = [e.response.strip() for e in examples]

    # 2. generate -----------------------------------------------------------------------
    gen: dict[str, dict] = {}
    bar = progress(n * len(names), "eval: generate", unit="sample")
    for k, name in enumerate(names):
        model, tok = (first_model, first_tok) if k == 0 else _load_policy_and_tokenizer(name, chosen[name], cfg, device)
        try:
            if standard:  # the query text rendered once (first policy's chat template), re-encoded per tokenizer
                from rlhflab.data.formats import query_ids

                q_ids = [query_ids(tok, e, cfg.data.max_query_length) for e in examples]
            else:
                q_ids = [build_query_ids(tok, e.subreddit, e.title, e.post, cfg.data.max_query_length) for e in examples]
        except DataError as e:
            raise StageError(f"policy '{name}': {e}") from None
        seed_everything(ev.seed)  # same seed per policy: identical policies give identical summaries
        ids, texts, has_eos = generate_texts(model, tok, q_ids, cfg.data.response_length, ev.temperature,
                                             batch_size=batch_size, progress=bar)
        entropy = response_entropy(model, q_ids, ids, tok.pad_token_id, batch_size=min(batch_size, 8))
        # "raw": decoded as PPO hands responses to the RM (leading space kept); "texts": stripped, for judges and signals.
        gen[name] = {"ids": ids, "raw": texts, "texts": [t.strip() for t in texts], "has_eos": has_eos, "entropy": entropy,
                     "tokens": [len(x) - (1 if e else 0) for x, e in zip(ids, has_eos)]}
        del model
        if k == 0:
            first_model = None
    bar.close()

    # 3. per-policy metrics -------------------------------------------------------------
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rm, rm_dir = _eval_reward(cfg, reward_path, device)
    gold_on = cfg.data.task == "tldr-synth"

    # "reference" is scored like a policy (RM, gold, lengths, signals), but has no generation.
    all_texts = {"reference": references, **{nm: gen[nm]["texts"] for nm in names}}
    # The RM reads what it read in training and PPO: " {summary}" references, decoded policy responses.
    rm_inputs = {"reference": [e.response for e in examples], **{nm: gen[nm]["raw"] for nm in names}}
    rm_scores = ({nm: score_rewards(rm, examples, txt, batch_size=batch_size).tolist() for nm, txt in rm_inputs.items()}
                 if rm is not None else {})
    gold_parts = {nm: _gold_scores(posts, txt) for nm, txt in all_texts.items()} if gold_on else {}
    gold = {nm: [float(g.total) for g in parts] for nm, parts in gold_parts.items()}
    n_words = {nm: [len(words(t)) for t in txt] for nm, txt in all_texts.items()}

    edges = None
    if rm_scores:
        allv = np.concatenate([np.asarray(v) for v in rm_scores.values()])
        lo, hi = float(allv.min()), float(allv.max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, HIST_BINS + 1)

    def common(nm: str) -> dict:
        d: dict[str, Any] = {"n": n, "length_words": _stats(n_words[nm])}
        if rm_scores:
            v = np.asarray(rm_scores[nm])
            mean, lo, hi = bootstrap_ci(v, n_boot=ev.bootstrap, seed=ev.seed)
            d.update(rm_score_mean=mean, rm_score_ci=[lo, hi], rm_score_std=float(v.std()),
                     rm_histogram={"edges": edges.tolist(), "counts": np.histogram(v, bins=edges)[0].tolist()})
        else:
            d.update(rm_score_mean=None, rm_score_ci=None, rm_score_std=None, rm_histogram=None)
        if gold:
            mean, lo, hi = bootstrap_ci(gold[nm], n_boot=ev.bootstrap, seed=ev.seed)
            d.update(gold_mean=mean, gold_ci=[lo, hi], length_gold_corr=pearson(n_words[nm], gold[nm]))
            d["rm_gold_corr"] = pearson(rm_scores[nm], gold[nm]) if rm_scores else None
            # What the gold score is made of: key-fact coverage, and how many summaries state a fact or
            # number the post lacks (an RM that cannot check facts against the post pays for those).
            parts = gold_parts[nm]
            d["gold_coverage_mean"] = float(np.mean([g.coverage for g in parts]))
            d["gold_hallucination_rate"] = float(np.mean([g.hallucinated > 0 for g in parts]))
        else:
            d.update(gold_mean=None, gold_ci=None, length_gold_corr=None, rm_gold_corr=None,
                     gold_coverage_mean=None, gold_hallucination_rate=None)
        return d

    results_policies: dict[str, dict] = {}
    signals: dict[str, dict] = {}
    for nm in names:
        g = gen[nm]
        rl = [scorer.score(ref, hyp)["rougeL"].fmeasure for ref, hyp in zip(references, g["texts"])]
        rl_mean, rl_lo, rl_hi = bootstrap_ci(rl, n_boot=ev.bootstrap, seed=ev.seed)
        ent = np.asarray(g["entropy"], dtype=np.float64)
        results_policies[nm] = {"path": chosen[nm], **common(nm), "rougeL": rl_mean, "rougeL_ci": [rl_lo, rl_hi],
                                "entropy": float(np.nanmean(ent)) if np.isfinite(ent).any() else None,
                                "length_tokens": _stats(g["tokens"]),
                                "no_eos_rate": 1.0 - float(np.mean(g["has_eos"]))}
        signals[nm] = summarize_signals(g["texts"], titles=titles, posts=posts, contains_eos=g["has_eos"],
                                        lengths=n_words[nm], scores=rm_scores.get(nm),
                                        title_copy_threshold=ev.title_copy_threshold, min_ngram=ev.prompt_copy_min_ngram)
    reference = common("reference")
    reference["rougeL"] = 1.0
    signals["reference"] = summarize_signals(references, titles=titles, posts=posts, lengths=n_words["reference"],
                                             scores=rm_scores.get("reference"), title_copy_threshold=ev.title_copy_threshold,
                                             min_ngram=ev.prompt_copy_min_ngram)

    # 4. judges: pairwise comparisons ---------------------------------------------------
    pairs = [(nm, "reference") for nm in names] + [(names[j], names[i]) for i in range(len(names)) for j in range(i + 1, len(names))]
    per_post_scores = {"gold": gold, "rm": rm_scores}
    comparisons = []
    gold_outcomes: dict[str, np.ndarray] = {}
    for judge, scores in per_post_scores.items():
        if not scores:
            continue
        for a, b in pairs:
            o = _outcomes(scores[a], scores[b])
            if judge == "gold":
                gold_outcomes[f"{a} vs {b}"] = o
            comparisons.append(_compare(a, b, judge, o, n_words[a], n_words[b], ev.bootstrap, ev.seed))

    agreement = None
    judges = [j for j, s in per_post_scores.items() if s]
    if ev.llm_judge.base_url:
        from rlhflab.judges.llm import LLMJudge

        judge = LLMJudge.from_config(ev.llm_judge, cache_dir=out_dir / "judge_cache", seed=ev.seed)
        judges.append("llm")
        agreement = {}
        all_gold, all_llm = [], []
        for a, b in pairs:
            verdicts = judge.judge_pairs(posts, all_texts[a], all_texts[b])
            o = np.array([{"a": 1.0, "b": 0.0, "tie": 0.5}[v.winner] for v in verdicts])
            comparisons.append(_compare(a, b, "llm", o, n_words[a], n_words[b], ev.bootstrap, ev.seed))
            if gold_outcomes:
                agreement[f"{a} vs {b}"] = judge_agreement(gold_outcomes[f"{a} vs {b}"], o)
                all_gold.append(gold_outcomes[f"{a} vs {b}"])
                all_llm.append(o)
        agreement = ({**agreement, "all": judge_agreement(np.concatenate(all_gold), np.concatenate(all_llm))}
                     if all_gold else None)

    # 5. write --------------------------------------------------------------------------
    meta = {"split": ev.split, "data": label, "n_prompts": n, "n_prompts_requested": ev.n_prompts,
            "temperature": ev.temperature, "response_length": cfg.data.response_length, "seed": ev.seed,
            "bootstrap": ev.bootstrap, "policies": chosen, "reward_model": str(rm_dir) if rm is not None else None,
            "judges": judges, "entropy_definition": ENTROPY_DEFINITION, "lc_method": LC_METHOD,
            "comparison_order": COMPARISON_ORDER, "title_copy_threshold": ev.title_copy_threshold,
            "skipped_rows": skipped.total}
    results = _clean({"meta": meta, "policies": results_policies, "reference": reference, "comparisons": comparisons,
                      "signals": signals, "judges_agreement": agreement})
    write_json(out_dir / "results.json", results)

    samples = []
    for i, e in enumerate(examples):
        row = {"id": e.id, "subreddit": e.subreddit, "title": e.title, "post": e.post, "reference": references[i],
               "reference_gold": gold["reference"][i] if gold else None,
               "reference_rm": rm_scores["reference"][i] if rm_scores else None, "policies": {}}
        for nm in names:
            g = gen[nm]
            row["policies"][nm] = {"summary": g["texts"][i], "gold": gold[nm][i] if gold else None,
                                   "rm": rm_scores[nm][i] if rm_scores else None, "tokens": g["tokens"][i],
                                   "has_eos": g["has_eos"][i], "entropy": g["entropy"][i]}
        samples.append(_clean(row))
    tmp = out_dir / ".samples.jsonl.tmp"
    tmp.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    tmp.replace(out_dir / "samples.jsonl")

    metrics: dict[str, Any] = {"eval/n_prompts": n}
    for nm, d in results_policies.items():
        for key in ("rougeL", "rm_score_mean", "gold_mean", "gold_coverage_mean", "gold_hallucination_rate",
                    "entropy", "no_eos_rate"):
            metrics[f"eval/{nm}/{key}"] = d[key]
        metrics[f"eval/{nm}/length_tokens_mean"] = d["length_tokens"]["mean"]
        metrics.update({f"eval/{nm}/{k}": v for k, v in signals[nm].items()})
    metrics["eval/reference/gold_mean"] = reference["gold_mean"]
    for c in comparisons:
        metrics[f"eval/{c['judge']}/{c['a']}_vs_{c['b']}/win_rate"] = c["win_rate"]
        metrics[f"eval/{c['judge']}/{c['a']}_vs_{c['b']}/lc_win_rate"] = c["lc_win_rate"]
    metrics = _clean(metrics)
    if not (run_dir / "config.yaml").exists():  # the report reads it; `rlhflab run` and the training stages write it too
        save_config(cfg, run_dir / "config.yaml")
    write_json(out_dir / "metrics.json", metrics)  # last: its presence marks the stage finished
    return metrics
