"""`rlhflab eval --policy DIR [--policy NAME=DIR ...]`: external policy folders evaluated from the
CLI, named after their folders; the 'rm' judge from reward.sources (here the gold judge)."""
import json
import shutil
import sys

import pytest

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_evaluate import OVERRIDES, built, one_thread  # noqa: E402,F401  (module fixtures)

from rlhflab import cli  # noqa: E402
from rlhflab.errors import StageError  # noqa: E402
from rlhflab.stages.evaluate import policy_names  # noqa: E402


def test_policy_names():
    assert policy_names(["runs/a/ppo/policy", "mine=/x/y", "/m/ckpt", "/n/ckpt/"]) == {
        "ppo": "runs/a/ppo/policy", "mine": "/x/y", "ckpt": "/m/ckpt", "ckpt-2": "/n/ckpt/"}
    with pytest.raises(StageError, match="expected DIR or NAME=DIR"):
        policy_names(["=/x"])


def test_eval_cli_external_policies_and_gold_reward(built, tmp_path, capsys):
    root, cfg = built
    ext = tmp_path / "elsewhere"
    shutil.copytree(cfg.run_dir / "sft" / "policy", ext / "base" / "policy")
    shutil.copytree(cfg.run_dir / "ppo" / "policy", ext / "tuned")
    args = ["eval", "--policy", str(ext / "base" / "policy"), "--policy", f"mine={ext / 'tuned'}", "--only",
            f"out_dir={root}", "name=cli", "eval.batch_size=4", "reward.sources=[{kind: gold}]",
            f"data.dir={cfg.run_dir / 'data'}"] + OVERRIDES
    assert cli.main(args) == 0
    results = json.loads((root / "cli" / "eval" / "results.json").read_text())
    assert results["meta"]["policies"] == {"base": str(ext / "base" / "policy"), "mine": str(ext / "tuned")}
    assert results["meta"]["reward_model"] == "gold"
    for name in ("base", "mine"):  # the 'rm' judge is the gold reward here: the same numbers as the gold judge
        pol = results["policies"][name]
        assert pol["rm_score_mean"] == pytest.approx(pol["gold_mean"], abs=1e-6)  # float32 scores
    assert "eval/mine/gold_mean" in json.loads(capsys.readouterr().out)


def test_eval_cli_missing_policy_is_a_message(built, tmp_path, capsys):
    root, cfg = built
    code = cli.main(["eval", "--policy", str(tmp_path / "nope"), "--only", f"out_dir={root}", "name=cli2",
                     f"data.dir={cfg.run_dir / 'data'}"] + OVERRIDES)
    assert code == 1 and "no HF model directory" in capsys.readouterr().err
