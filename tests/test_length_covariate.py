"""The length term of the Bradley-Terry loss (``rm.length_covariate``, models/length_covariate.py)."""

from __future__ import annotations

import io
import json
import math
import shutil

import pytest
import torch

from rlhflab.data.tldr import PrefExample
from rlhflab.models.length_covariate import CONFIG_KEY, LengthCovariate, word_count_diff
from rlhflab.runtime import read_jsonl
from rlhflab.stages import common, rm


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_word_count_diff_counts_whitespace_words():
    got = word_count_diff([" a b c", "one", "  x  y "], [" a", "one two three", "z"])
    assert got.tolist() == [2.0, -2.0, 1.0] and got.dtype == torch.float32


def test_bt_loss_with_the_length_offset_hand_values():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.5])
    offset = torch.tensor([0.5, -1.0])
    # -log sigmoid(1 + 0.5) and -log sigmoid(-0.5 - 1)
    want = torch.tensor([math.log1p(math.exp(-1.5)), math.log1p(math.exp(1.5))])
    torch.testing.assert_close(rm.bt_loss(chosen, rejected, offset), want)
    torch.testing.assert_close(rm.bt_loss(chosen, rejected, None), rm.bt_loss(chosen, rejected))


def _optim(lr=0.1):
    from rlhflab.config import OptimConfig

    return OptimConfig(lr=lr, warmup_ratio=0.0, weight_decay=0.5)


def test_w_gradient_and_first_adamw_step_by_hand():
    lc = LengthCovariate(_optim(lr=0.1), total_steps=10, warmup_ratio=0.0, device=torch.device("cpu"))
    assert lc.value == 0.0
    margins = torch.tensor([0.3, -0.2, 1.0])
    chosen, rejected = [" a b c", " a", " a b"], [" a", " a b c d", " a b"]  # dlen 2, -3, 0
    loss = rm.bt_loss(margins, torch.zeros(3), lc.offset(chosen, rejected)).sum()
    loss.backward()
    # d/dw sum -log sigmoid(m + w d) at w = 0 is -sum sigmoid(-m) d
    want = -(_sig(-0.3) * 2 + _sig(0.2) * -3)
    assert lc.w.grad.item() == pytest.approx(want, rel=1e-6)
    lc.step(num_processes=1)
    # AdamW's first step moves by lr * sign(grad) (bias-corrected m/sqrt(v) = +-1, eps negligible);
    # no weight decay on w although the config asks for 0.5.
    assert lc.value == pytest.approx(-0.1 * math.copysign(1.0, want), rel=1e-4)
    assert lc.w.grad is None


def test_w_learns_the_labels_length_preference_when_r_cannot_see_length():
    """Labels from sigmoid(q_c - q_r + 0.4 * dlen): with r fit on quality features only, w -> 0.4."""
    g = torch.Generator().manual_seed(0)
    n = 4000
    q = torch.randn(n, generator=g)
    dlen = torch.randint(-5, 6, (n,), generator=g).float()
    y = torch.rand(n, generator=g) < torch.sigmoid(q + 0.4 * dlen)
    sign = torch.where(y, 1.0, -1.0)  # orient every pair as (chosen, rejected)
    a = torch.zeros((), requires_grad=True)  # r = a * quality
    opt = torch.optim.Adam([a], lr=0.05)
    lc = LengthCovariate(_optim(lr=0.05), total_steps=10**6, warmup_ratio=0.0, device=torch.device("cpu"))
    words = {k: " ".join(["w"] * (k + 6)) for k in range(-5, 6)}
    chosen = [words[int(d * s)] for d, s in zip(dlen, sign)]
    rejected = [words[0]] * n
    for _ in range(400):
        loss = rm.bt_loss(a * q * sign, torch.zeros(n), lc.offset(chosen, rejected)).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        lc.step(num_processes=1)
    assert lc.value == pytest.approx(0.4, abs=0.06)
    assert a.item() == pytest.approx(1.0, abs=0.15)


def test_state_round_trip_continues_identically():
    def make():
        return LengthCovariate(_optim(), total_steps=8, warmup_ratio=0.25, device=torch.device("cpu"))

    def one_step(lc, m):
        rm.bt_loss(torch.tensor([m]), torch.zeros(1), lc.offset([" a b c"], [" a"])).sum().backward()
        lc.step(num_processes=1)

    a, b = make(), make()
    for m in (0.1, -0.4, 0.3):
        one_step(a, m)
    buf = io.BytesIO()  # through torch.save/load, as the checkpoint's meta travels
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for m in (0.2, -0.1):
        one_step(a, m)
        one_step(b, m)
    assert a.value == b.value and a.scheduler.get_last_lr() == b.scheduler.get_last_lr()


class _WordCountRM:
    """Scores = number of words: the RM's margin is the length difference."""

    class model:
        training = False

        @staticmethod
        def eval():
            pass

        @staticmethod
        def train(_flag=True):
            pass

    def score_texts(self, queries, responses, batch_size=64, normalize=True):
        return torch.tensor([float(len(r.split())) for r in responses])


def test_evaluate_rm_scores_r_alone_and_reports_the_full_model_beside_it(smoke_cfg):
    pairs = [PrefExample(str(i), "q", [], c, r, [], [], "s", "t", "p")
             for i, (c, r) in enumerate([(" a b c", " a"), (" a", " a b c d"), (" a b", " a b c")])]
    m, _ = rm.evaluate_rm(_WordCountRM(), pairs, smoke_cfg("data.task=tldr"), length_w=-2.0)
    # r alone: margins 2, -3, -1 -> 1 of 3 right. With w = -2: 2 - 4 = -2, -3 + 6 = 3, -1 + 2 = 1 -> 2 of 3.
    assert m["eval/accuracy"] == pytest.approx(1 / 3)
    assert m["eval/length_term/accuracy"] == pytest.approx(2 / 3)
    assert m["eval/length_term/loss"] == pytest.approx(sum(math.log1p(math.exp(-d)) for d in (-2, 3, 1)) / 3)
    assert m["rm/length_covariate_w"] == -2.0
    plain, _ = rm.evaluate_rm(_WordCountRM(), pairs, smoke_cfg("data.task=tldr"))
    assert not any(k.startswith("eval/length_term/") for k in plain)


# ------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def covariate_rm_run(smoke_sft_run, tmp_path_factory):
    cfg = smoke_sft_run.model_copy(update={"out_dir": str(tmp_path_factory.mktemp("lc"))})
    cfg = cfg.model_copy(update={"rm": cfg.rm.model_copy(update={"length_covariate": True})})
    shutil.copytree(smoke_sft_run.run_dir / "sft", cfg.run_dir / "sft")
    rm.main(cfg)
    return cfg


def test_rm_stage_learns_w_records_it_and_keeps_the_reward_r_alone(covariate_rm_run):
    from rlhflab.models.reward import RewardModel

    d = covariate_rm_run.run_dir / "rm"
    final = json.loads((d / "metrics.json").read_text())
    w = final["rm/length_covariate_w"]
    assert w != 0.0 and final["train/length_covariate_w"] == w
    assert [r["train/length_covariate_w"] for r in read_jsonl(d / "metrics.jsonl") if "train/loss" in r][-1] == w
    for key in ("eval/length_term/accuracy", "eval/length_term/normalized_accuracy",
                "eval/length_term/expected_normalized_accuracy", "eval/normalized_accuracy"):
        assert isinstance(final[key], float), key
    acc, n, bayes = final["eval/length_term/accuracy"], final["eval/pairs"], final["data/bayes_accuracy"]
    assert final["eval/length_term/normalized_accuracy_se"] == pytest.approx((acc * (1 - acc) / n) ** 0.5 / (bayes - 0.5))
    saved = json.loads((d / "reward" / "config.json").read_text())
    assert saved[CONFIG_KEY] == pytest.approx(w)
    # The saved reward is r: its validation accuracy is the stage's eval/accuracy, without the term.
    r = RewardModel.from_pretrained(d / "reward")
    rows = read_jsonl(d / "eval_pairs.jsonl")
    assert r.bias == pytest.approx(final["rm/bias"])
    acc = sum(row["score_chosen"] > row["score_rejected"] for row in rows) / len(rows)
    assert acc == pytest.approx(final["eval/accuracy"])


def test_rm_resume_restores_w_and_its_optimizer(covariate_rm_run, tmp_path, monkeypatch):
    cfg = covariate_rm_run.model_copy(update={"out_dir": str(tmp_path)})
    shutil.copytree(covariate_rm_run.run_dir / "sft", cfg.run_dir / "sft")
    monkeypatch.setenv(common.STOP_ENV, "5")
    with pytest.raises(common.StopRequested):
        rm.main(cfg)
    monkeypatch.delenv(common.STOP_ENV)
    rm.main(cfg, resume=True)
    a = json.loads((covariate_rm_run.run_dir / "rm" / "metrics.json").read_text())
    b = json.loads((cfg.run_dir / "rm" / "metrics.json").read_text())
    assert a["rm/length_covariate_w"] == b["rm/length_covariate_w"]
    assert a["eval/accuracy"] == b["eval/accuracy"] and a["rm/bias"] == b["rm/bias"]


def test_report_reading_names_the_length_term():
    from rlhflab.report.html import rm_length_reading

    cls, text = rm_length_reading({"rm/length_covariate_w": 0.0215, "eval/length_coef": 0.004,
                                   "data/labeler_length_coef": 0.03})
    assert "took up 0.021 per word" in text and "rises by 0.004 per extra word" in text
    cls, text = rm_length_reading({"eval/length_coef": 0.028, "data/labeler_length_coef": 0.03})
    assert "length term" not in text and cls == "warn"


@pytest.mark.slow
def test_two_process_fsdp2_rm_with_the_length_term_follows_one_process_and_resumes(
        covariate_rm_run, synth_data_dir, smoke_data_overrides, tmp_path):
    """2 processes (gloo), FSDP2, stopped after step 4 and resumed from the sharded checkpoint: w's
    gradient is averaged over processes and its state rides in the checkpoint's meta, so the loss
    and w follow the 1-process run step by step."""
    from test_multiprocess import _assert_close_runs, _launch

    shutil.copytree(covariate_rm_run.run_dir / "sft", tmp_path / "smoke" / "sft")
    over = (*smoke_data_overrides, "parallel.sharding=fsdp2", "rm.length_covariate=true")
    _launch("rm", tmp_path, synth_data_dir, over, stop_after=4)
    assert (tmp_path / "smoke" / "rm" / "state" / "ckpt-00000004" / "shards" / ".metadata").is_file()
    two = _launch("rm", tmp_path, synth_data_dir, over, resume=True)
    _assert_close_runs(covariate_rm_run.run_dir / "rm", tmp_path / "smoke" / "rm",
                       ("train/loss", "train/length_covariate_w"))
    one = json.loads((covariate_rm_run.run_dir / "rm" / "metrics.json").read_text())
    assert two["rm/length_covariate_w"] == pytest.approx(one["rm/length_covariate_w"], rel=1e-4, abs=1e-6)


def test_length_covariate_lr_sets_w_own_peak_lr_only(covariate_rm_run, tmp_path, monkeypatch):
    """``rm.length_covariate_lr`` reaches w's AdamW (the config's ``rm.optim.lr`` differs)."""
    cfg = covariate_rm_run.model_copy(update={"out_dir": str(tmp_path)})
    cfg = cfg.model_copy(update={"rm": cfg.rm.model_copy(update={"length_covariate_lr": 0.05})})
    shutil.copytree(covariate_rm_run.run_dir / "sft", cfg.run_dir / "sft")
    seen = []

    class _Spy(LengthCovariate):
        def __init__(self, optim, *a, **k):
            super().__init__(optim, *a, **k)
            seen.append(self)

    monkeypatch.setattr(rm, "LengthCovariate", _Spy)
    monkeypatch.setenv(common.STOP_ENV, "1")
    with pytest.raises(common.StopRequested):
        rm.main(cfg)
    (lc,) = seen
    assert lc.optimizer.param_groups[0]["initial_lr"] == 0.05 != cfg.rm.optim.lr
