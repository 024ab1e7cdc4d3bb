"""The evaluation stage on tiny in-process models and a small tldr-synth dataset.

One module-scoped run evaluates three policies: ``sft`` and ``ppo`` (two random tiny Llamas
at <run>/sft/policy and <run>/ppo/policy) and ``twin`` (the SFT directory again, passed as
an extra policy). The twin must tie the SFT policy on every post; the other numbers are
checked against independent recomputation from samples.jsonl, the gold judge and the RM.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhflab.config import ArchConfig, load_config
from rlhflab.errors import StageError

N = 6  # evaluation posts
OVERRIDES = ["data.max_query_length=192", "data.response_length=32", f"eval.n_prompts={N}", "eval.bootstrap=100",
             "data.synth.n_sft_train=8", "data.synth.n_sft_validation=8", "data.synth.n_sft_test=2",
             "data.synth.n_pref_train=8", "data.synth.n_pref_validation=4", "data.synth.vocab_size=1024"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls: on a shared 2-core machine, intra-op threads cost far more in contention
    # than they save (measured 5 ms vs 0.1 ms per 16x1024 linear), so this module runs on one.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(root: Path, *extra: str):
    return load_config(None, [f"out_dir={root}", "name=run"] + OVERRIDES + list(extra))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A run dir with data/, sft/policy, ppo/policy (different weights) and rm/reward."""
    from rlhflab.data.tldr_synth import synthesize
    from rlhflab.models.policy import build_policy, load_tokenizer
    from rlhflab.models.reward import RewardModel, build_reward_backbone

    root = tmp_path_factory.mktemp("eval")
    cfg = _cfg(root)
    run = cfg.run_dir
    synthesize(run / "data", cfg.data.synth, progress=False)
    tok = load_tokenizer(run / "data" / "tokenizer")
    arch = ArchConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_position_embeddings=256)
    for name, seed in (("sft", 0), ("ppo", 1)):
        policy = build_policy(tok, arch=arch, seed=seed)
        policy.save_pretrained(run / name / "policy")
        tok.save_pretrained(run / name / "policy")
    rm = build_reward_backbone(str(run / "sft" / "policy"), tok, seed=2)
    RewardModel(rm, tok, bias=0.125, max_length=256).save(run / "rm" / "reward")
    return root, cfg


@pytest.fixture(scope="module")
def evaluated(built):
    from rlhflab.stages.evaluate import main

    root, cfg = built
    metrics = main(cfg, policies={"twin": str(cfg.run_dir / "sft" / "policy")}, batch_size=4)
    out = cfg.run_dir / "eval"
    results = json.loads((out / "results.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return cfg, metrics, results, samples


def _comparison(results, a, b, judge):
    (c,) = [c for c in results["comparisons"] if (c["a"], c["b"], c["judge"]) == (a, b, judge)]
    return c


def test_results_schema(evaluated):
    cfg, metrics, results, samples = evaluated
    assert set(results) == {"meta", "policies", "reference", "comparisons", "signals", "judges_agreement"}
    assert list(results["policies"]) == ["sft", "ppo", "twin"]
    assert results["meta"]["n_prompts"] == N and results["meta"]["judges"] == ["gold", "rm"]
    assert "log(len_a/len_b)" in results["meta"]["lc_method"] and "temperature 1" in results["meta"]["entropy_definition"]
    for d in results["policies"].values():
        assert d["n"] == N
        for key in ("rougeL", "rm_score_mean", "gold_mean", "gold_coverage_mean", "gold_hallucination_rate",
                    "entropy", "no_eos_rate"):
            assert isinstance(d[key], float), key
        lo, hi = d["gold_ci"]
        assert lo <= d["gold_mean"] <= hi
        assert sum(d["rm_histogram"]["counts"]) == N and len(d["rm_histogram"]["edges"]) == 21
        assert d["length_tokens"]["max"] <= cfg.data.response_length
    # 3 policies vs reference + 3 pairs (later policy first), for each of the gold and RM judges
    pairs = {(c["a"], c["b"]) for c in results["comparisons"]}
    assert pairs == {("sft", "reference"), ("ppo", "reference"), ("twin", "reference"), ("ppo", "sft"),
                     ("twin", "sft"), ("twin", "ppo")}
    assert len(results["comparisons"]) == 12
    for c in results["comparisons"]:
        assert c["n"] == N and c["wins"] + c["losses"] + c["ties"] == N
        assert c["ci"][0] <= c["win_rate"] <= c["ci"][1]
        assert 0.0 <= c["lc_win_rate"] <= 1.0
    assert set(results["signals"]) == {"sft", "ppo", "twin", "reference"}
    assert set(results["signals"]["ppo"]) >= {"hack/title_copy_rate", "hack/prompt_copy_rate", "hack/repetition_rate",
                                              "hack/no_eos_rate", "hack/length_score_corr"}
    assert results["judges_agreement"] is None  # no LLM judge configured
    assert len(samples) == N and set(samples[0]["policies"]) == {"sft", "ppo", "twin"}
    # metrics.json holds what main returned; the stage counts as finished
    assert json.loads((cfg.run_dir / "eval" / "metrics.json").read_text()) == metrics
    assert metrics["eval/gold/ppo_vs_sft/win_rate"] == _comparison(results, "ppo", "sft", "gold")["win_rate"]


def test_identical_policy_ties_everywhere(evaluated):
    _, _, results, samples = evaluated
    for s in samples:
        assert s["policies"]["twin"] == s["policies"]["sft"]
    for judge in ("gold", "rm"):
        c = _comparison(results, "twin", "sft", judge)
        assert (c["win_rate"], c["ci"], c["ties"], c["wins"], c["losses"]) == (0.5, [0.5, 0.5], N, 0, 0)
        assert c["lc_win_rate"] == pytest.approx(0.5, abs=1e-9)
    assert results["policies"]["twin"]["gold_mean"] == results["policies"]["sft"]["gold_mean"]


def test_numbers_match_independent_recomputation(evaluated):
    from rouge_score import rouge_scorer

    from rlhflab.judges.gold import score_many
    from rlhflab.models.reward import RewardModel

    cfg, _, results, samples = evaluated
    posts = [s["post"] for s in samples]
    # gold judge on the reference summaries
    ref_gold = [g.total for g in score_many(posts, [s["reference"] for s in samples])]
    assert [s["reference_gold"] for s in samples] == pytest.approx(ref_gold)
    assert results["reference"]["gold_mean"] == pytest.approx(np.mean(ref_gold))
    # gold win rate of ppo over sft, per post: 1 / 0 / 0.5
    out = [1.0 if p > q else 0.0 if p < q else 0.5 for p, q in
           ((s["policies"]["ppo"]["gold"], s["policies"]["sft"]["gold"]) for s in samples)]
    c = _comparison(results, "ppo", "sft", "gold")
    assert c["win_rate"] == pytest.approx(np.mean(out)) and c["ties"] == out.count(0.5)
    # RM: normalised score (raw - bias 0.125) of " {reference}" on the query text
    rm = RewardModel.from_pretrained(cfg.run_dir / "rm" / "reward")
    assert rm.bias == 0.125
    from rlhflab.data.tldr import format_query
    queries = [format_query(s["subreddit"], s["title"], s["post"]) for s in samples]  # short posts: no truncation here
    direct = rm.score_texts(queries, [" " + s["reference"] for s in samples]).tolist()
    assert [s["reference_rm"] for s in samples] == pytest.approx(direct, abs=1e-5)
    # ROUGE-L and no-EOS rate of the ppo policy
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rl = [scorer.score(s["reference"], s["policies"]["ppo"]["summary"])["rougeL"].fmeasure for s in samples]
    assert results["policies"]["ppo"]["rougeL"] == pytest.approx(np.mean(rl))
    no_eos = np.mean([not s["policies"]["ppo"]["has_eos"] for s in samples])
    assert results["policies"]["ppo"]["no_eos_rate"] == pytest.approx(no_eos)
    assert results["signals"]["ppo"]["hack/no_eos_rate"] == pytest.approx(no_eos)
    # What the gold score is made of, per policy: coverage and the share of summaries inventing a fact
    for nm in ("sft", "ppo"):
        parts = score_many(posts, [s["policies"][nm]["summary"] for s in samples])
        d = results["policies"][nm]
        assert d["gold_coverage_mean"] == pytest.approx(np.mean([g.coverage for g in parts]))
        assert d["gold_hallucination_rate"] == pytest.approx(np.mean([g.hallucinated > 0 for g in parts]))
        assert 0.0 <= d["gold_hallucination_rate"] <= 1.0


def test_response_entropy_matches_unpadded_forward(built):
    """Left-padded queries of different lengths, right-padded responses: each sample's mean
    entropy equals the one computed alone, without padding, from softmax(logits) directly."""
    from rlhflab.models.policy import load_policy
    from rlhflab.stages.evaluate import response_entropy

    _, cfg = built
    model = load_policy(cfg.run_dir / "sft" / "policy")
    queries = [[5, 6, 7, 8, 9], [10, 11]]
    responses = [[12, 13], [14, 15, 16, 17]]
    got = response_entropy(model, queries, responses, pad_token_id=1)
    for q, r, g in zip(queries, responses, got):
        ids = torch.tensor([q + r])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(q) - 1: len(q) + len(r) - 1].double()
        p = torch.softmax(logits, -1)
        want = float((-(p * p.log()).sum(-1)).mean())
        assert g == pytest.approx(want, rel=1e-4)
    assert math.isnan(response_entropy(model, [[5]], [[]], pad_token_id=1)[0])


def test_no_policy_is_a_clear_error(tmp_path):
    from rlhflab.stages.evaluate import main

    with pytest.raises(StageError, match="no policy to evaluate.*rlhflab sft"):
        main(_cfg(tmp_path))
    with pytest.raises(StageError, match="policy 'mine': no HF model directory"):
        main(_cfg(tmp_path), policies={"mine": str(tmp_path / "missing")})


def test_llm_judge_without_rm(built, monkeypatch, tmp_path):
    """LLM judge comparisons and gold/LLM agreement; a missing RM leaves RM numbers null."""
    from rlhflab.judges.llm import LLMJudge, Verdict
    from rlhflab.stages.evaluate import main

    calls = []

    def fake_judge_pairs(self, posts, a, b):  # prefers the longer summary; ties on equal length
        calls.append(self.cache_dir)
        return [Verdict("a" if len(x) > len(y) else "b" if len(x) < len(y) else "tie", "", False, False) for x, y in zip(a, b)]

    monkeypatch.setattr(LLMJudge, "judge_pairs", fake_judge_pairs)
    _, base = built
    cfg = _cfg(tmp_path, "data.synth.n_sft_validation=8", f"data.dir={base.run_dir / 'data'}", "eval.n_prompts=50",
               "eval.llm_judge.base_url=http://127.0.0.1:9/v1")
    main(cfg, policies={"sft": str(base.run_dir / "sft" / "policy")}, include_defaults=False, batch_size=8)
    results = json.loads((cfg.run_dir / "eval" / "results.json").read_text())
    samples = [json.loads(line) for line in (cfg.run_dir / "eval" / "samples.jsonl").read_text().splitlines()]
    assert results["meta"]["n_prompts"] == 8 and results["meta"]["n_prompts_requested"] == 50  # clipped to the split
    assert results["meta"]["judges"] == ["gold", "llm"] and results["meta"]["reward_model"] is None
    assert results["policies"]["sft"]["rm_score_mean"] is None and samples[0]["policies"]["sft"]["rm"] is None
    assert calls == [cfg.run_dir / "eval" / "judge_cache"]
    llm = _comparison(results, "sft", "reference", "llm")
    want = [1.0 if len(s["policies"]["sft"]["summary"]) > len(s["reference"]) else 0.0 for s in samples]
    assert llm["win_rate"] == pytest.approx(np.mean(want))
    # agreement over posts where neither judge tied
    gold = [1.0 if s["policies"]["sft"]["gold"] > s["reference_gold"] else 0.0 if s["policies"]["sft"]["gold"] < s["reference_gold"] else 0.5
            for s in samples]
    keep = [i for i in range(8) if gold[i] != 0.5]
    agree = results["judges_agreement"]["sft vs reference"]
    assert agree["judge/n_compared"] == len(keep)
    if keep:
        assert agree["judge/agreement"] == pytest.approx(np.mean([gold[i] == want[i] for i in keep]))
    assert results["judges_agreement"]["all"]["judge/n_compared"] == len(keep)
