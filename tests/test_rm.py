"""Reward-model stage (rlhflab.stages.rm) and the RM pieces it relies on (rlhflab.models.reward)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from rlhflab.config import ArchConfig
from rlhflab.data.errors import DataError
from rlhflab.data.tldr import PrefExample
from rlhflab.errors import StageError
from rlhflab.models.policy import build_policy
from rlhflab.models.reward import RewardModel, build_reward_backbone, last_token_index, minilm_path, sequence_scores
from rlhflab.runtime import read_jsonl
from rlhflab.stages import common, rm


# ------------------------------------------------------------------------ math
def test_bt_loss_hand_values():
    chosen = torch.tensor([2.0, 0.0, -1.0])
    rejected = torch.tensor([0.0, 0.0, 1.0])
    # -log sigmoid(2) = log(1 + e^-2); -log sigmoid(0) = log 2; -log sigmoid(-2) = log(1 + e^2)
    want = torch.tensor([math.log1p(math.exp(-2)), math.log(2), math.log1p(math.exp(2))])
    torch.testing.assert_close(rm.bt_loss(chosen, rejected), want)


def test_last_token_index_either_padding_side():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    assert last_token_index(mask).tolist() == [1, 3, 3, 1]


def test_lstsq_recovers_known_coefficients():
    g = torch.tensor([0.1, -0.3, 0.5, 0.0, 0.2])
    length = torch.tensor([3.0, 1.0, -2.0, 4.0, 0.0])
    a, b = rm._lstsq_no_intercept(g, length, 2.0 * g + 0.5 * length)
    assert a == pytest.approx(2.0) and b == pytest.approx(0.5)


@pytest.fixture(scope="module")
def tiny_decoder_rm(tmp_path_factory, synth_tokenizer):
    """A 1-layer Llama RM (random policy backbone) with the synth tokenizer."""
    tok = synth_tokenizer
    src = tmp_path_factory.mktemp("policy")
    build_policy(tok, arch=ArchConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                      max_position_embeddings=128), seed=0).save_pretrained(src)
    tok.save_pretrained(src)
    return RewardModel(build_reward_backbone(str(src), tok, seed=1), tok, max_length=64)


def test_score_is_read_at_the_eos_whatever_the_padding(tiny_decoder_rm):
    r = tiny_decoder_rm
    queries, responses = ["SUBREDDIT: r/a\n\nTITLE: b\n\nPOST: c d e\n\nTL;DR:", "short"], [" my cat", " a much longer summary text here"]
    ids, mask = r.encode(queries, responses)  # right-padded, EOS last
    assert ids[0, last_token_index(mask)[0]] == r.tokenizer.eos_token_id
    alone = [sequence_scores(r.model, ids[i: i + 1, : int(mask[i].sum())], mask[i: i + 1, : int(mask[i].sum())]) for i in range(2)]
    right = sequence_scores(r.model, ids, mask)
    # Left padding: the same tokens shifted right; position ids skip the padding.
    left_ids, left_mask = torch.full_like(ids, r.tokenizer.pad_token_id), torch.zeros_like(mask)
    for i in range(2):
        n = int(mask[i].sum())
        left_ids[i, -n:], left_mask[i, -n:] = ids[i, :n], True
    left = sequence_scores(r.model, left_ids, left_mask)
    # The stage's training forward: HF's own pooling through the (possibly DDP) wrapper.
    hf_chosen, hf_rejected = rm.pair_scores(r.model, r, queries[:1], responses[:1], responses[1:], torch.device("cpu"))
    for i in range(2):
        torch.testing.assert_close(right[i], alone[i][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(left[i], alone[i][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hf_chosen[0], alone[0][0], rtol=1e-5, atol=1e-5)
    # The rejected text was scored against queries[0]; it must differ from the chosen score.
    assert not torch.allclose(hf_chosen, hf_rejected)


def test_head_init_statistics():
    """Huang detail: head ~ N(0, 1/sqrt(d+1)), bias 0 (MiniLM's classifier has a bias; d = 384)."""
    model = build_reward_backbone(str(minilm_path()), None, seed=3)
    w, b = model.classifier.weight, model.classifier.bias
    assert w.shape == (1, 384)
    # 384 draws: the sample std is within ~3.6% (1 sigma) of the truth; allow 15%.
    assert w.std().item() == pytest.approx(1 / math.sqrt(385), rel=0.15)
    assert abs(w.mean().item()) < 3 / math.sqrt(385) / math.sqrt(384) * 1.5
    assert torch.count_nonzero(b) == 0
    assert all(not m.training or m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


# ------------------------------------------------------------- cross-tokenizer
@pytest.fixture
def one_thread():
    """Tiny forwards gain nothing from threads, and on a shared 2-core machine lose a lot to them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_minilm_rm_scores_policy_text_in_its_own_tokens_and_learns(synth_tokenizer, one_thread):
    from transformers import AutoTokenizer

    from rlhflab.models.generation import generate_texts

    policy = build_policy(synth_tokenizer, arch=ArchConfig(hidden_size=32, num_layers=1, num_heads=2,
                                                           intermediate_size=64, max_position_embeddings=64), seed=0)
    query = "SUBREDDIT: r/relationships\n\nTITLE: my landlord kept my deposit\n\nPOST: he kept it.\n\nTL;DR:"
    _, texts, _ = generate_texts(policy, synth_tokenizer, [synth_tokenizer(query)["input_ids"]], 8, 1.0)
    wordpiece = AutoTokenizer.from_pretrained(minilm_path())
    model = build_reward_backbone(str(minilm_path()), wordpiece, seed=0)
    r = RewardModel(model, wordpiece, max_length=128)
    ids, mask = r.encode([query], texts)
    assert ids[0].tolist()[: int(mask[0].sum())] == wordpiece(query, texts[0])["input_ids"]  # [CLS] q [SEP] r [SEP]
    assert ids[0, 0] == wordpiece.cls_token_id and len(synth_tokenizer) != len(wordpiece)

    # A few Bradley-Terry steps on a toy preference move the scores the right way.
    queries = [query, "SUBREDDIT: r/pets\n\nTITLE: my dog\n\nPOST: my dog ate my homework.\n\nTL;DR:"]
    chosen = [" my landlord kept my deposit", " my dog ate my homework"]
    rejected = [" lol", " lol"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-5)
    before = (r.score_texts(queries, chosen, normalize=False) - r.score_texts(queries, rejected, normalize=False))
    model.train()
    for _ in range(5):
        c, j = rm.pair_scores(model, r, queries, chosen, rejected, torch.device("cpu"))
        rm.bt_loss(c, j).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    after = (r.score_texts(queries, chosen, normalize=False) - r.score_texts(queries, rejected, normalize=False))
    assert (after > 0).all() and (after > before + 0.5).all()


# ------------------------------------------------------------------ validation
class _WordCountRM(RewardModel):
    """A stand-in RM whose raw score is the response's word count (so it always prefers the longer)."""

    def __init__(self):
        self.model = torch.nn.Linear(1, 1)
        self.bias = 0.0

    def score_texts(self, queries, responses, batch_size=64, normalize=True):
        return torch.tensor([float(len(r.split())) for r in responses])


def _pair(i, chosen, rejected):
    return PrefExample(str(i), "q", [], chosen, rejected, [], [], "s", "t", "p")


def test_evaluate_rm_accuracy_and_length_buckets(smoke_cfg):
    pairs = [_pair(0, " a b c", " a"),             # |dlen| 2, correct
             _pair(1, " a", " a b c d e f"),       # 5, wrong
             _pair(2, " a b c d e f g h", " a"),   # 7, correct
             _pair(3, " a", " " + "w " * 12),      # 11, wrong
             _pair(4, " " + "w " * 13, " a b")]    # 11, correct
    m, rows = rm.evaluate_rm(_WordCountRM(), pairs, smoke_cfg("data.task=tldr"))
    assert m["eval/accuracy"] == pytest.approx(3 / 5)
    assert m["eval/margin"] == pytest.approx((2 - 5 + 7 - 11 + 11) / 5)
    assert m["eval/accuracy_lendiff_0-2"] == 1.0 and m["eval/accuracy_lendiff_0-2_n"] == 1
    assert m["eval/accuracy_lendiff_3-5"] == 0.0 and m["eval/accuracy_lendiff_6-10"] == 1.0
    assert m["eval/accuracy_lendiff_>10"] == pytest.approx(0.5) and m["eval/accuracy_lendiff_>10_n"] == 2
    assert m["eval/loss"] == pytest.approx(sum(math.log1p(math.exp(-d)) for d in (2, -5, 7, -11, 11)) / 5)
    assert rows[1]["score_chosen"] == 1.0 and rows[1]["words_rejected"] == 6
    assert "eval/gold_agreement" not in m  # real TL;DR data has no gold judge


def _gs(total, facts=()):
    """A GoldScore stand-in: only the fields faithfulness_metrics reads."""
    from types import SimpleNamespace

    return SimpleNamespace(total=total, hallucinated=len(facts), hallucinated_facts=tuple(facts))


def test_faithfulness_metrics_by_hand():
    """Pairs where exactly one summary invents a fact: RM, labels and gold preference for the faithful one."""
    margin = torch.tensor([1.0, -1.0, 2.0, 0.5, -0.5, 3.0])
    chosen = [_gs(0.9), _gs(0.6, ["ask:quit"]), _gs(0.7), _gs(0.8, ["secondary:student"]), _gs(0.5), _gs(0.6, ["42"])]
    rejected = [_gs(0.6, ["ask:hr"]), _gs(0.8), _gs(0.7), _gs(0.6), _gs(0.5, ["ask:quit", "7"]), _gs(0.6, ["3"])]
    m = rm.faithfulness_metrics(margin, chosen, rejected)
    # Pairs 0, 1, 3, 4 have exactly one inventing summary (2: neither, 5: both). The faithful one is
    # the chosen in 0 and 4. The RM (margin > 0 picks the chosen) picks the faithful one in 0 and 1.
    assert m["eval/faithful/pairs"] == 4
    assert m["eval/faithful/rm_prefers_faithful"] == pytest.approx(2 / 4)
    assert m["eval/faithful/labels_prefer_faithful"] == pytest.approx(2 / 4)
    # gold: 0 faithful higher (1), 1 faithful higher (1), 3 faithful lower (0), 4 tie (0.5)
    assert m["eval/faithful/gold_prefers_faithful"] == pytest.approx(2.5 / 4)
    # asks only: pairs 0, 1, 4
    assert m["eval/faithful/ask/pairs"] == 3
    assert m["eval/faithful/ask/rm_prefers_faithful"] == pytest.approx(2 / 3)
    assert m["eval/faithful/ask/labels_prefer_faithful"] == pytest.approx(2 / 3)
    assert m["eval/faithful/ask/gold_prefers_faithful"] == pytest.approx(2.5 / 3)
    none = rm.faithfulness_metrics(torch.tensor([1.0]), [_gs(0.9)], [_gs(0.8)])
    assert none["eval/faithful/pairs"] == 0 and none["eval/faithful/rm_prefers_faithful"] is None


def test_faithfulness_metrics_see_the_generators_invented_facts():
    """The gold judge flags every kind of invention the 'halluc' writer makes, and never the oracle's."""
    import random

    from rlhflab.data import tldr_synth as T
    from rlhflab.judges.gold import score_many

    rng = random.Random(5)
    ids = T._Ids()
    posts = [ids.new_post(rng) for _ in range(40)]
    halluc = [T.halluc_summary(p, rng) for p in posts]
    oracle = [T.oracle_summary(p, rng) for p in posts]
    text = [p.post for p in posts]
    s_h, s_o = score_many(text, halluc), score_many(text, oracle)
    assert all(s.hallucinated > 0 for s in s_h) and all(s.hallucinated == 0 for s in s_o)
    # an RM that always prefers the oracle (chosen) is faithful on every pair; one preferring length is not
    m = rm.faithfulness_metrics(torch.ones(len(posts)), s_o, s_h)
    assert m["eval/faithful/pairs"] == 40 and m["eval/faithful/rm_prefers_faithful"] == 1.0
    assert m["eval/faithful/gold_prefers_faithful"] == 1.0
    assert 0 < m["eval/faithful/ask/pairs"] < 40  # only some inventions are asks


def test_evaluate_rm_gold_metrics_on_tldr_synth(smoke_cfg, synth_data_dir):
    """On tldr-synth the word-count RM's length coefficient is 1 exactly, gold agreement and the
    normalised accuracy follow their definitions."""
    from rlhflab.data.tldr import load_preferences
    from rlhflab.data.tldr_synth import gold_scores
    from rlhflab.models.policy import load_tokenizer

    cfg = smoke_cfg()
    tok = load_tokenizer(synth_data_dir / "tokenizer")
    pairs, _ = load_preferences(str(synth_data_dir), "validation", tok, cfg.data.max_query_length, cfg.data.response_length)
    m, _ = rm.evaluate_rm(_WordCountRM(), pairs, cfg)
    assert m["eval/length_coef"] == pytest.approx(1.0) and m["eval/gold_coef"] == pytest.approx(0.0, abs=1e-9)
    bayes = json.loads((synth_data_dir / "stats.json").read_text())["bayes_accuracy"]
    assert m["data/bayes_accuracy"] == bayes
    assert m["eval/normalized_accuracy"] == pytest.approx((m["eval/accuracy"] - 0.5) / (bayes - 0.5))
    acc, n = m["eval/accuracy"], len(pairs)
    assert m["eval/normalized_accuracy_se"] == pytest.approx(math.sqrt(acc * (1 - acc) / n) / (bayes - 0.5))
    gc = gold_scores([p.post for p in pairs], [p.chosen.strip() for p in pairs])
    gr = gold_scores([p.post for p in pairs], [p.rejected.strip() for p in pairs])
    lc = [len(p.chosen.split()) - len(p.rejected.split()) for p in pairs]
    # Equal lengths give margin 0 (sign 0), never agreeing with a nonzero gold difference.
    decided = [(d != 0 and (d > 0) == (a > b)) for d, a, b in zip(lc, gc, gr) if a != b]
    assert m["eval/gold_agreement"] == pytest.approx(sum(decided) / len(decided))
    if m["eval/near_tie_pairs"]:
        assert m["eval/prefers_longer_near_tie"] == 1.0
    assert m["eval/faithful/pairs"] >= 0 and {"eval/faithful/ask/rm_prefers_faithful", "eval/faithful/labels_prefer_faithful"} <= set(m)
    # Expected accuracy: the labelers' probability of agreeing with the RM's pick, by hand.
    from rlhflab.data.tldr_synth import labeler_prob

    tau, beta = cfg.data.synth.labeler_tau, cfg.data.synth.labeler_len_beta
    pc = [labeler_prob(a, b, len(p.chosen.split()), len(p.rejected.split()), tau, beta) for a, b, p in zip(gc, gr, pairs)]
    want = sum(q if d > 0 else 1 - q for q, d in zip(pc, lc)) / len(pc)
    bayes_here = sum(max(q, 1 - q) for q in pc) / len(pc)
    assert m["eval/expected_accuracy"] == pytest.approx(want)
    assert m["data/bayes_accuracy_eval_pairs"] == pytest.approx(bayes_here)
    assert m["eval/expected_normalized_accuracy"] == pytest.approx((want - 0.5) / (bayes_here - 0.5))
    # A perfect labeler-logit RM reaches the Bayes accuracy exactly: normalised 1.
    class _LogitRM(_WordCountRM):
        def score_texts(self, queries, responses, batch_size=64, normalize=False):
            g = gold_scores([_post_of[q] for q in queries], [r.strip() for r in responses])
            return torch.tensor([x / tau + beta * len(r.split()) for x, r in zip(g, responses)])

    _post_of = {p.query: p.post for p in pairs}
    m2, _ = rm.evaluate_rm(_LogitRM(), pairs, cfg)
    assert m2["eval/expected_normalized_accuracy"] == pytest.approx(1.0)


# ------------------------------------------------------------------- the stage
def test_rm_stage_outputs_bias_and_loads_with_transformers(smoke_rm_run):
    from transformers import AutoModelForSequenceClassification

    from rlhflab.data.tldr import load_sft

    cfg = smoke_rm_run
    d = cfg.run_dir / "rm"
    final = json.loads((d / "metrics.json").read_text())
    train = [r for r in read_jsonl(d / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert train[0]["train/loss"] == pytest.approx(math.log(2), abs=0.05)  # small head init: r_c ~ r_r
    for key in ("eval/accuracy", "eval/margin", "eval/gold_agreement", "data/bayes_accuracy",
                "eval/normalized_accuracy", "eval/length_coef", "rm/bias"):
        assert isinstance(final[key], float), key
    assert final["rm/backbone"] == "sft" and final["rm/bias"] != 0.0
    assert len(read_jsonl(d / "eval_pairs.jsonl")) == final["eval/pairs"] == 32

    # The bias centres the normalised scores of the reference summaries at 0.
    r = RewardModel.from_pretrained(d / "reward")
    assert r.bias == pytest.approx(final["rm/bias"])
    refs, _ = load_sft(str(cfg.data.dir), "train", r.tokenizer, cfg.data.max_query_length, cfg.data.response_length)
    normalised = r.score_texts([e.query for e in refs], [e.response for e in refs])
    assert abs(normalised.mean().item()) < 1e-4
    # Plain transformers gives the same raw score (pooling at the last non-pad token = the EOS).
    plain = AutoModelForSequenceClassification.from_pretrained(d / "reward")
    ids, mask = r.encode([refs[0].query], [refs[0].response])
    raw = plain(input_ids=ids, attention_mask=mask.long()).logits[0, 0]
    assert raw.item() == pytest.approx(normalised[0].item() + r.bias, abs=1e-4)


def test_rm_resume_reaches_the_same_weights(smoke_rm_run, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    cfg = smoke_rm_run.model_copy(update={"out_dir": str(tmp_path)})
    shutil.copytree(smoke_rm_run.run_dir / "sft", cfg.run_dir / "sft")
    monkeypatch.setenv(common.STOP_ENV, "5")
    with pytest.raises(common.StopRequested):
        rm.main(cfg)
    monkeypatch.delenv(common.STOP_ENV)
    rm.main(cfg, resume=True)
    want = load_file(smoke_rm_run.run_dir / "rm" / "reward" / "model.safetensors")
    got = load_file(cfg.run_dir / "rm" / "reward" / "model.safetensors")
    for k in want:
        assert torch.equal(want[k], got[k]), k
    a = json.loads((smoke_rm_run.run_dir / "rm" / "metrics.json").read_text())
    b = json.loads((cfg.run_dir / "rm" / "metrics.json").read_text())
    assert a["rm/bias"] == b["rm/bias"] and a["eval/accuracy"] == b["eval/accuracy"]


def test_rm_on_sft_backbone_without_sft_is_a_clear_error(smoke_cfg):
    with pytest.raises(StageError, match=r"reward_backbone=sft needs the SFT policy .* run `rlhflab sft`"):
        rm.main(smoke_cfg())


def test_rm_malformed_preference_file_names_file_row_field(smoke_cfg, synth_data_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_data_dir, data)
    f = data / "preference" / "train.jsonl"
    rows = [json.loads(x) for x in f.read_text().splitlines()]
    rows[3]["choice"] = 2
    f.write_text("".join(json.dumps(x) + "\n" for x in rows))
    # minilm: no SFT run needed, and the data is read before any model is built.
    with pytest.raises(DataError, match=r"preference/train\.jsonl: row 3: field 'choice'"):
        rm.main(smoke_cfg(f"data.dir={data}", "model.reward_backbone=minilm"))
