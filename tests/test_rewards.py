"""Bring-your-own models and rewards: PPO from model folders outside any run directory, Python
reward functions (weighted, summed), the gold judge as a reward, remote RMs over loopback HTTP
(rlhflab's own /v1/score and OpenRLHF's shape) with their failure modes."""
import http.server
import json
import math
import sys
import threading
import time

import pytest
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import reward_fns  # noqa: E402
from ppo_fixtures import build_inputs, make_run  # noqa: E402

from rlhflab.errors import StageError  # noqa: E402
from rlhflab.models.reward import RewardModel  # noqa: E402
from rlhflab.rewards import Reward, RewardError, build_reward, check_scores, score  # noqa: E402
from rlhflab.rewards.remote import RemoteSource  # noqa: E402
from rlhflab.stages import ppo  # noqa: E402
from rlhflab.stages.common import make_accelerator  # noqa: E402


@pytest.fixture(scope="module")
def tpl(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("byo"))


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("RLHFLAB_NO_PROGRESS", "1")
    monkeypatch.delenv("RLHFLAB_STOP_AFTER_STEP", raising=False)
    reward_fns.CALLS.clear()


def external(tpl, tmp_path, name, *overrides):
    """A run whose folder holds no sft/ or rm/: the models come from the template's folders."""
    return make_run(tpl, tmp_path, name, f"model.sft_policy={tpl / 'sft' / 'policy'}",
                    f"model.reward_model={tpl / 'rm' / 'reward'}", *overrides, copy=False)


def rollout_of(cfg, reward_fns_=()):
    acc = make_accelerator()
    models, kind, note = ppo.load_ppo_models(cfg, acc.device, reward_fns_)
    prompts = ppo.load_prompts(cfg, models.tokenizer)[: cfg.ppo.batch_size]
    return models, kind, note, prompts, ppo.collect_rollout(models, prompts, 0, cfg.ppo, cfg.response_length, acc)


# ------------------------------------------------------------------ models from anywhere
def test_ppo_from_external_policy_and_rm_folders(tpl, tmp_path):
    cfg = external(tpl, tmp_path, "ext")
    result = ppo.main(cfg)
    assert not (cfg.run_dir / "sft").exists() and not (cfg.run_dir / "rm").exists()
    assert result["update"] == 2 and result["critic"] == "reward"  # the critic starts from the external RM
    assert (cfg.run_dir / "ppo" / "policy" / "config.json").exists()
    # the same numbers as a run whose folder holds copies of the same models
    ref = ppo.main(make_run(tpl, tmp_path, "copied"))
    assert result["objective/kl"] == pytest.approx(ref["objective/kl"], abs=1e-6)
    assert result["objective/scores"] == pytest.approx(ref["objective/scores"], abs=1e-6)


def test_missing_external_folder_names_the_key(tpl, tmp_path):
    cfg = make_run(tpl, tmp_path, "missing", f"model.sft_policy={tmp_path / 'nowhere'}", copy=False)
    with pytest.raises(StageError, match="model.sft_policy=.*nowhere.*no HF model folder"):
        ppo.load_ppo_models(cfg, torch.device("cpu"))
    cfg = make_run(tpl, tmp_path, "missing_rm", f"model.sft_policy={tpl / 'sft' / 'policy'}", copy=False)
    with pytest.raises(StageError, match="reward model at .*missing_rm/rm/reward .*model.reward_model"):
        ppo.load_ppo_models(cfg, torch.device("cpu"))


def test_hub_name_offline_is_a_clear_error(tpl, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = make_run(tpl, tmp_path, "hub", "model.sft_policy=nobody/no-such-model", copy=False)
    with pytest.raises(StageError, match="model.sft_policy=nobody/no-such-model: cannot fetch it from the Hugging Face hub"):
        ppo.load_ppo_models(cfg, torch.device("cpu"))


# ------------------------------------------------------------------- Python functions
def test_function_rewards_weighted_and_summed(tpl, tmp_path):
    cfg = external(tpl, tmp_path, "fn", 'reward.sources=[{kind: function, path: "reward_fns:n_words", weight: 0.5},'
                   ' {kind: function, path: "reward_fns:mentions_post", weight: -2.0}, {kind: rm, weight: 3.0}]')
    models, kind, note, prompts, rollout = rollout_of(cfg)
    texts = rollout.response_texts
    rm = RewardModel.from_pretrained(tpl / "rm" / "reward")
    rm_part = rm.score_texts([p.query for p in prompts], texts)  # raw - bias 0.25
    expect = torch.tensor([0.5 * len(t.split()) - 2.0 * sum(w in p.post.split() for w in t.split())
                           for p, t in zip(prompts, texts)]) + 3.0 * rm_part
    assert torch.allclose(rollout.rm_scores, expect, atol=1e-5)
    assert torch.equal(rollout.scores, torch.where(rollout.contains_eos, rollout.rm_scores, torch.full_like(expect, -1.0)))
    call = reward_fns.CALLS[0]
    assert call["prompts"] == [p.query for p in prompts] and call["completions"] == texts
    assert call["post"] == [p.post for p in prompts] and {"post", "title", "subreddit", "id"} <= set(call["columns"])
    assert "query_ids" not in call["columns"]
    assert kind == "reward" and note == ""  # an RM among the sources: the critic still starts from it


def test_ppo_with_only_a_function_reward_falls_back_to_a_policy_critic(tpl, tmp_path):
    cfg = make_run(tpl, tmp_path, "fnonly", f"model.sft_policy={tpl / 'sft' / 'policy'}",
                   'reward.sources=[{kind: function, path: "reward_fns:n_words"}]', copy=False)
    result = ppo.main(cfg)  # no RM anywhere: none is needed
    assert result["critic"] == "policy" and "needs a trained RM" in result["critic_note"]
    rows = [json.loads(x) for x in (cfg.run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["objective/scores"]) for r in rows)


def test_in_memory_callable_and_gold_source(tpl, tmp_path):
    seen = []

    def closure(prompts, completions, **cols):
        seen.append(len(completions))
        return [1.0] * len(completions)

    cfg = external(tpl, tmp_path, "gold", "reward.sources=[{kind: gold, weight: 2.0}]")
    models, kind, note, prompts, rollout = rollout_of(cfg, [(0.25, closure)])
    from rlhflab.judges.gold import score_many

    gold = torch.tensor([g.total for g in score_many([p.post for p in prompts], [t.strip() for t in rollout.response_texts])])
    assert torch.allclose(rollout.rm_scores, 2.0 * gold + 0.25, atol=1e-6)
    assert seen == [8] and kind == "policy" and "gold" in note


@pytest.mark.parametrize("fn,match", [("wrong_length", "7 scores for 8 completions"), ("nan_score", "score 0 is nan"),
                                      ("not_numbers", "score 0 is not a number"), ("nowhere", "has no attribute nowhere")])
def test_bad_function_answers_are_errors_naming_the_source(tpl, tmp_path, fn, match):
    cfg = external(tpl, tmp_path, f"bad_{fn}", f'reward.sources=[{{kind: function, path: "reward_fns:{fn}"}}]')
    with pytest.raises(RewardError, match=f"{match}"):
        rollout_of(cfg)


def test_default_reward_is_the_trained_rm_itself(tpl, tmp_path):
    cfg = external(tpl, tmp_path, "default")
    reward = build_reward(cfg, torch.device("cpu"))
    assert isinstance(reward, RewardModel) and reward.bias == pytest.approx(0.25)


# ------------------------------------------------------------------------ remote RMs
class _Handler(http.server.BaseHTTPRequestHandler):
    mode = "ok"  # set per test on the server
    rm = None

    def log_message(self, *a):
        pass

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        mode = self.server.mode
        self.server.requests.append(body)
        if mode == "sleep":
            time.sleep(1.0)
        if mode == "500":
            return self._send(500, b'{"error": "boom"}')
        if mode == "400":
            return self._send(400, b'{"error": "bad request"}')
        if mode == "html":
            return self._send(200, b"<html>oops</html>")
        if self.path == "/get_reward":  # OpenRLHF: query = prompt + response
            n = len(body["query"])
            rewards = [float(len(q)) for q in body["query"]]
            if mode == "short":
                rewards = rewards[:-1]
            if mode == "nan":
                rewards[0] = float("nan")
            return self._send(200, json.dumps({"rewards": rewards, "n": n}).encode())
        scores = [float(len(r)) for r in body["responses"]]
        if mode == "strings":
            scores = [str(s) for s in scores]
        if mode == "nokey":
            return self._send(200, json.dumps({"score": scores}).encode())
        return self._send(200, json.dumps({"scores": scores}).encode())

    def _send(self, status, payload):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def fake_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.mode, srv.requests = "ok", []
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


PROMPTS, COMPLETIONS = ["q one", "q two", "q one"], [" a", " bb", " ccc"]


def test_remote_protocols_on_loopback(fake_server):
    srv, url = fake_server
    ours = RemoteSource(url + "/v1/score", protocol="rlhflab")
    assert ours(PROMPTS, COMPLETIONS) == [2.0, 3.0, 4.0]
    assert [r["prompt"] for r in srv.requests] == ["q one", "q two"]  # one request per distinct prompt
    assert srv.requests[0]["responses"] == [" a", " ccc"]
    srv.requests.clear()
    theirs = RemoteSource(url + "/get_reward", protocol="openrlhf", batch_size=2)
    assert theirs(PROMPTS, COMPLETIONS, label=["x", None, "z"]) == [7.0, 8.0, 9.0]
    assert srv.requests[0] == {"query": ["q one a", "q two bb"], "prompts": ["q one", "q two"], "labels": ["x", ""]}
    assert len(srv.requests) == 2


@pytest.mark.parametrize("mode,path,match", [
    ("short", "/get_reward", "2 scores for 3 completions"), ("nan", "/get_reward", "score 0 is nan"),
    ("strings", "/v1/score", "score 0 is not a number"), ("nokey", "/v1/score", "no 'scores' in the answer"),
    ("html", "/v1/score", "not JSON"), ("400", "/v1/score", "answered HTTP 400")])
def test_remote_garbage_is_an_error_at_once(fake_server, mode, path, match):
    srv, url = fake_server
    srv.mode = mode
    src = RemoteSource(url + path, protocol="openrlhf" if path == "/get_reward" else "rlhflab", max_retries=3,
                       backoff_base_s=0.01)
    with pytest.raises(RewardError, match=match):
        src(PROMPTS, COMPLETIONS)
    assert len(srv.requests) == 1  # bad answers are not retried


def test_remote_5xx_is_retried_with_backoff_then_fails(fake_server):
    srv, url = fake_server
    srv.mode = "500"
    src = RemoteSource(url + "/v1/score", max_retries=2, backoff_base_s=0.05)
    t0 = time.perf_counter()
    with pytest.raises(RewardError, match=r"failed 3 times \(last: HTTP 500"):
        src(PROMPTS, COMPLETIONS)
    assert len(srv.requests) == 3 and time.perf_counter() - t0 >= 0.05 + 0.1


def test_remote_timeout_and_server_down_never_hang(fake_server):
    srv, url = fake_server
    srv.mode = "sleep"
    t0 = time.perf_counter()
    with pytest.raises(RewardError, match="failed 1 times .*timed out"):
        RemoteSource(url + "/v1/score", timeout_s=0.2, max_retries=0)(PROMPTS, COMPLETIONS)
    assert time.perf_counter() - t0 < 1.0
    srv.shutdown()
    srv.server_close()  # nothing listens on the port any more
    with pytest.raises(RewardError, match="failed 2 times .*is it running"):
        RemoteSource(url + "/v1/score", timeout_s=1.0, max_retries=1, backoff_base_s=0.01)(PROMPTS, COMPLETIONS)


def test_ppo_against_rlhflab_serve_equals_the_local_rm(tpl, tmp_path):
    from rlhflab.serve.app import BackgroundServer, create_app

    app = create_app(tpl / "sft" / "policy", tpl / "rm" / "reward", device="cpu")
    with BackgroundServer(app) as srv:
        cfg = make_run(tpl, tmp_path, "remote", f"model.sft_policy={tpl / 'sft' / 'policy'}",
                       f'reward.sources=[{{kind: remote, url: "{srv.url}/v1/score", timeout_s: 10}}]', copy=False)
        models, kind, note, prompts, rollout = rollout_of(cfg)
        result = ppo.main(cfg)
    local = RewardModel.from_pretrained(tpl / "rm" / "reward").score_texts([p.query for p in prompts], rollout.response_texts)
    assert torch.allclose(rollout.rm_scores, local, atol=1e-5)  # the served scores are normalised (raw - bias)
    assert kind == "policy" and result["update"] == 2


def test_ppo_with_remote_server_down_stops_with_a_clear_error(tpl, tmp_path):
    cfg = make_run(tpl, tmp_path, "down", f"model.sft_policy={tpl / 'sft' / 'policy'}",
                   'reward.sources=[{kind: remote, url: "http://127.0.0.1:9/v1/score", max_retries: 1, backoff_base_s: 0.01}]',
                   copy=False)
    with pytest.raises(RewardError, match="127.0.0.1:9/v1/score failed 2 times"):
        ppo.main(cfg)
    assert not (cfg.run_dir / "ppo" / "metrics.json").exists()


def test_check_scores():
    assert check_scores([1, 2.5], 2, "x").tolist() == [1.0, 2.5]
    for bad in ([True, 1.0], [1.0, float("inf")], None):
        with pytest.raises(RewardError):
            check_scores(bad, 2, "x")
    r = Reward([(1.0, lambda p, c, **k: [1.0] * len(c)), (2.0, lambda p, c, **k: [0.5] * len(c))])
    assert score(r, [{"query": "a"}, {"query": "b"}], [" x", " y"]).tolist() == [2.0, 2.0]
