import json

import pytest
import torch

from rlhflab.runtime import CheckpointManager, MetricsLogger, read_jsonl, rng_state, seed_everything, set_rng_state, write_json


def _write(payload):
    def write(d):
        torch.save(payload, d / "state.pt")
    return write


def test_checkpoint_latest_and_rotation(tmp_path):
    cm = CheckpointManager(tmp_path / "state", keep=2)
    assert cm.latest() is None
    for step in (1, 2, 3):
        cm.save(step, _write({"step": step}))
    assert cm.latest().name == "ckpt-00000003"
    assert sorted(p.name for p in (tmp_path / "state").glob("ckpt-*")) == ["ckpt-00000002", "ckpt-00000003"]
    assert torch.load(cm.latest() / "state.pt")["step"] == 3


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path):
    cm = CheckpointManager(tmp_path / "state")
    cm.save(1, _write({"step": 1}))

    def broken(d):
        (d / "half.pt").write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        cm.save(2, broken)
    latest = cm.latest()
    assert latest.name == "ckpt-00000001" and torch.load(latest / "state.pt")["step"] == 1
    assert not (tmp_path / "state" / "ckpt-00000002").exists()
    # the next save cleans the stale temp dir and succeeds
    cm.save(2, _write({"step": 2}))
    assert cm.latest().name == "ckpt-00000002"
    assert not list((tmp_path / "state").glob(".ckpt-00000002.tmp-*"))


def test_stale_pointer_falls_back_to_newest_complete(tmp_path):
    cm = CheckpointManager(tmp_path / "state")
    cm.save(1, _write({"step": 1}))
    (tmp_path / "state" / "latest").write_text("ckpt-00000099")
    assert cm.latest().name == "ckpt-00000001"


def test_metrics_logger_truncates_on_resume(tmp_path):
    lg = MetricsLogger(tmp_path, enabled=True)
    for s in range(1, 6):
        lg.log(s, {"loss": torch.tensor(1.0 / s), "nan": float("nan")})
    lg.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[1]["loss"] == pytest.approx(0.5) and rows[0]["nan"] is None
    MetricsLogger(tmp_path, enabled=True, resume_step=3).close()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    MetricsLogger(tmp_path / "other", enabled=False).log(1, {"x": 1})
    assert not (tmp_path / "other" / "metrics.jsonl").exists()


def test_rng_state_roundtrip_and_write_json(tmp_path):
    seed_everything(0)
    st = rng_state()
    a = torch.rand(3)
    set_rng_state(st)
    assert torch.equal(a, torch.rand(3))
    write_json(tmp_path / "x.json", {"a": torch.tensor(2.0)})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 2.0}


def _adamw_pair():
    from rlhflab.config import OptimConfig
    from rlhflab.stages.common import make_optimizer

    g = torch.Generator().manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(7, 5, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    cfg = OptimConfig(lr=1e-2, eps=1e-5, weight_decay=0.1)
    return make_optimizer(a, cfg, fused=True), torch.optim.AdamW(b, lr=1e-2, eps=1e-5, weight_decay=0.1), a, b, g


def test_make_optimizer_is_fused_adamw_with_the_plain_update():
    fused, plain, a, b, g = _adamw_pair()
    assert isinstance(fused, torch.optim.AdamW) and fused.defaults["fused"] is True
    assert fused.defaults["eps"] == 1e-5
    start = [x.detach().clone() for x in a]
    for _ in range(6):
        for x, y in zip(a, b):
            grad = torch.randn(x.shape, generator=g)
            x.grad, y.grad = grad.clone(), grad.clone()
        fused.step()
        plain.step()
    for x, y, x0 in zip(a, b, start):
        assert (x - x0).abs().max() > 1e-2  # six steps of lr 1e-2 moved every tensor
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    # a checkpoint of the fused optimizer resumes a plain one (and back): same state layout
    plain.load_state_dict(fused.state_dict())
    fused.load_state_dict(plain.state_dict())


def test_make_optimizer_falls_back_when_fusing_is_refused(monkeypatch):
    from rlhflab.config import OptimConfig
    from rlhflab.stages.common import make_optimizer

    real = torch.optim.AdamW

    def refusing(params, fused=None, **kw):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", refusing)
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(3))], OptimConfig(lr=1e-3), fused=True)
    assert isinstance(opt, real) and not opt.defaults.get("fused")


def test_make_optimizer_is_the_plain_adamw_unless_asked():
    from rlhflab.config import OptimConfig
    from rlhflab.stages.common import make_optimizer

    opt = make_optimizer([torch.nn.Parameter(torch.zeros(3))], OptimConfig(lr=1e-3))
    assert not opt.defaults.get("fused")
