"""report_to trackers through accelerate (mlflow offline on a file store: no network), the PPO sample
table (ppo/samples.jsonl + tracker tables), and the message when a tracker's package is missing."""
import importlib.util
import json
import sys

import pytest

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from ppo_fixtures import build_inputs, make_run  # noqa: E402

from rlhflab.errors import StageError  # noqa: E402
from rlhflab.runtime import read_jsonl  # noqa: E402
from rlhflab.stages import ppo  # noqa: E402


@pytest.fixture(scope="module")
def tpl(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("trk"))


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("RLHFLAB_NO_PROGRESS", "1")
    monkeypatch.delenv("RLHFLAB_STOP_AFTER_STEP", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_sample_table_and_no_tensorboard(tpl, tmp_path):
    cfg = make_run(tpl, tmp_path, "tab", "report_to=[]", "ppo.sample_table_every=1", "ppo.sample_table_rows=3")
    ppo.main(cfg)
    rows = read_jsonl(cfg.run_dir / "ppo" / "samples.jsonl")
    assert [r["step"] for r in rows] == [1, 1, 1, 2, 2, 2]
    assert set(rows[0]) == {"step", "prompt", "response", "score"}
    assert all(r["prompt"].startswith("SUBREDDIT: r/relationships") for r in rows)
    assert not (cfg.run_dir / "tb").exists()  # report_to=[]: metrics.jsonl only


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow not installed (pip install 'rlhflab[trackers]')")
def test_mlflow_offline_file_store_gets_metrics_and_tables(tpl, tmp_path):
    cfg = make_run(tpl, tmp_path, "mlf", "report_to=[tensorboard, mlflow]", "ppo.sample_table_every=2")
    ppo.main(cfg)
    store = tmp_path / "mlruns"
    (run,) = [p for p in store.glob("*/*") if (p / "meta.yaml").is_file() and (p / "metrics").is_dir()]
    assert (run / "tags" / "mlflow.runName").read_text() == "mlf/ppo"
    logged = read_jsonl(cfg.run_dir / "ppo" / "metrics.jsonl")
    kl = [line.split() for line in (run / "metrics" / "objective" / "kl").read_text().splitlines()]
    # mlflow's file store: "<timestamp> <value> <step>" per logged step
    assert [int(s) for _, _, s in kl] == [1, 2]
    assert [float(v) for _, v, _ in kl] == pytest.approx([r["objective/kl"] for r in logged], rel=1e-6)
    assert (run / "params" / "ppo.kl_coef").read_text() == "0.05"
    table = json.loads((run / "artifacts" / "samples" / "step_2.json").read_text())
    assert table["columns"] == ["prompt", "response", "score"] and len(table["data"]) == 8
    samples = read_jsonl(cfg.run_dir / "ppo" / "samples.jsonl")
    assert [r["score"] for r in samples] == pytest.approx([row[2] for row in table["data"]])
    assert any((cfg.run_dir / "tb" / "ppo").iterdir())  # TensorBoard as before


@pytest.mark.parametrize("tracker", [t for t in ("wandb", "trackio", "mlflow") if importlib.util.find_spec(t) is None])
def test_missing_tracker_package_is_refused_before_compute(tpl, tmp_path, tracker):
    cfg = make_run(tpl, tmp_path, f"no_{tracker}", f"report_to=[{tracker}]")
    with pytest.raises(StageError, match=f"report_to: {tracker} needs the package '{tracker}'.*rlhflab\\[trackers\\]"):
        ppo.main(cfg)
    assert not (cfg.run_dir / "ppo").exists()
