"""rlhflab.parallel: FSDP2 sharding on 2 CPU processes (gloo) against one unsharded process,
sharded checkpoints, sharded generation, gradient checkpointing, bf16, config/launcher checks.

The 2-process runs go through ``tests/parallel_worker.py`` (see its docstring) under
``python -m torch.distributed.run --nproc_per_node 2`` (what ``torchrun`` runs). Tolerances:
fp32 trajectories differ only by float summation order (the reduce-scatter, batch-size dependent
kernels): losses and grad norms to rel 1e-5, weights to 1e-6 (measured: 1.2e-7); a resumed run
continues bit for bit (0.0 measured); sampled tokens are equal; bf16 compute with fp32 master
weights tracks the fp32 losses to rel 5e-3 over 4 steps (measured: <= 8e-4).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhflab.config import ArchConfig, ConfigError, load_config

HERE = Path(__file__).parent
WORKER = HERE / "parallel_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(out: Path, processes: int, *overrides: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RLHFLAB_NO_PROGRESS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    if processes == 1:
        cmd = [sys.executable, str(WORKER), str(out), *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(_free_port()), str(WORKER), str(out), *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads((out / "result.json").read_text())


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("one")
    return _worker(out, 1), out


def test_fsdp2_two_processes_follow_one_process(one_process, tmp_path):
    one, one_dir = one_process
    two = _worker(tmp_path, 2, "parallel.sharding=fsdp2")
    assert not one["wrapped"] and two["wrapped"] and two["num_processes"] == 2
    # The same trajectory: global losses, grad norms, final weights.
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert two["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-5)
    assert one["losses"][-1] < one["losses"][0] - 0.3  # it did train
    w1, w2 = torch.load(one_dir / "weights.pt"), torch.load(tmp_path / "weights.pt")
    assert _max_diff(w1, w2) <= 1e-6
    # Each process holds half of params + grads + AdamW states (dim-0 shards; odd sizes round up).
    ratio = two["bytes"] / one["bytes"]
    assert 0.48 <= ratio <= 0.52, ratio
    # Sharded generation (each process its slice, EOS stop synchronised) = unsharded generation.
    assert two["tokens"] == one["tokens"]
    # Resume from the (sharded) step-2 checkpoint into fresh models reaches the same weights.
    assert two["sharded_ckpt"] and not one["sharded_ckpt"]
    assert _max_diff(w2, torch.load(tmp_path / "resumed.pt")) == 0.0
    assert _max_diff(w1, torch.load(one_dir / "resumed.pt")) == 0.0
    # The small state.pt beside the shards (and the unsharded one) loads with weights_only=True.
    from rlhflab.parallel import load_state_file

    for d in (tmp_path, one_dir):
        state = load_state_file(sorted((d / "state").glob("ckpt-*"))[-1])
        assert state["step"] == 2 and set(state["rng"]) == {"python", "numpy", "torch"}


@pytest.mark.slow
def test_fsdp2_bf16_checkpointing_offload_tracks_fp32(one_process, tmp_path):
    one, one_dir = one_process
    run = _worker(tmp_path, 2, "parallel.sharding=fsdp2", "parallel.mixed_precision=bf16",
                  "parallel.gradient_checkpointing=true", "parallel.cpu_offload=true")
    assert run["losses"] == pytest.approx(one["losses"], rel=5e-3)
    assert run["losses"] != pytest.approx(one["losses"], rel=1e-6)  # bf16 compute really ran
    w1, w3 = torch.load(one_dir / "weights.pt"), torch.load(tmp_path / "weights.pt")
    assert _max_diff(w1, w3) < 5e-2
    assert _max_diff(w3, torch.load(tmp_path / "resumed.pt")) == 0.0


# ------------------------------------------------------------------ in-process (1 process)
def _tiny():
    sys.path.insert(0, str(HERE))
    from ppo_fixtures import make_tokenizer

    from rlhflab.models.policy import build_policy

    tok = make_tokenizer()
    arch = ArchConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64)
    return tok, build_policy(tok, arch=arch, seed=0)


def _engine(*overrides: str):
    from rlhflab.parallel import make_engine
    from rlhflab.stages.common import make_accelerator

    return make_engine(load_config("smoke", list(overrides)), make_accelerator())


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    from rlhflab.models.reward import build_critic, token_scores

    tok, policy = _tiny()
    policy.save_pretrained(tmp_path / "p")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, len(tok), (4, 10), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :3] = False  # a left-padded row

    def grads(engine, model, critic):
        model.train()
        critic.train()
        loss = model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits.logsumexp(-1).mean()
        loss = loss + token_scores(critic, ids, mask).pow(2).mean()
        loss.backward()
        return {n: p.grad.clone() for m in (model, critic) for n, p in m.named_parameters()}

    plain = _engine()
    ckpt = _engine("parallel.gradient_checkpointing=true")
    from rlhflab.models.policy import load_policy

    a = grads(plain, plain.prepare(load_policy(tmp_path / "p")), plain.prepare(build_critic(tmp_path / "p", True)))
    model, critic = load_policy(tmp_path / "p"), build_critic(tmp_path / "p", True)
    ckpt.prepare(model), ckpt.prepare(critic)
    assert all(m.is_activation_checkpointing for m in (model, critic))
    b = grads(ckpt, model, critic)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)


def test_bf16_paths_track_fp32():
    """1 process: parallel.mixed_precision=bf16 (autocast, fp32 weights) and model.dtype=bfloat16
    (bf16 weights) both train; their losses track fp32 (rel 2e-2 over 3 AdamW steps)."""
    from rlhflab.config import OptimConfig
    from rlhflab.stages.common import make_optimizer
    from rlhflab.stages.sft import token_loss_sum

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 40, (4, 12), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def losses(*overrides):
        engine = _engine(*overrides)
        model = engine.prepare(_tiny()[1])
        opt = make_optimizer(model.parameters(), OptimConfig(lr=1e-2))
        out = []
        for _ in range(3):
            with engine.autocast():
                loss, n = token_loss_sum(model, batch)
            (loss / n).backward()
            opt.step()
            opt.zero_grad()
            out.append(float(loss.detach() / n))
        return out, next(model.parameters()).dtype

    fp32, d32 = losses()
    mixed, dmix = losses("parallel.mixed_precision=bf16")
    pure, dbf = losses("model.dtype=bfloat16")
    assert (d32, dmix, dbf) == (torch.float32, torch.float32, torch.bfloat16)  # master weights stay fp32 in mixed
    assert mixed == pytest.approx(fp32, rel=2e-2) and pure == pytest.approx(fp32, rel=2e-2)
    assert mixed != pytest.approx(fp32, rel=1e-7)


def test_frozen_models_take_the_frozen_dtype():
    engine = _engine("model.frozen_dtype=bfloat16")
    model = engine.frozen(_tiny()[1])
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    trained = engine.prepare(_tiny()[1])  # model.dtype stays float32 for the trained ones
    assert {p.dtype for p in trained.parameters()} == {torch.float32}


def test_config_and_launcher_precision_are_checked(monkeypatch):
    from rlhflab.errors import StageError
    from rlhflab.parallel import launcher_mixed_precision

    with pytest.raises(ConfigError, match="parallel.cpu_offload=true needs parallel.sharding=fsdp2"):
        load_config("smoke", ["parallel.cpu_offload=true"])
    with pytest.raises(ConfigError, match="parallel.sharding"):
        load_config("smoke", ["parallel.sharding=zero3"])
    cfg = load_config("smoke", ["parallel.sharding=fsdp2", "parallel.cpu_offload=true", "ppo.rollout_batch_size=4",
                                "ppo.forward_batch_size=2", "model.dtype=bfloat16"])
    assert (cfg.ppo.rollout_batch_size, cfg.ppo.forward_batch_size, cfg.model.dtype) == (4, 2, "bfloat16")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(StageError, match="parallel.mixed_precision=bf16"):
        launcher_mixed_precision(load_config("smoke").parallel)
    launcher_mixed_precision(load_config("smoke", ["parallel.mixed_precision=bf16"]).parallel)  # agrees: fine
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(StageError, match="fp16 is not supported"):
        launcher_mixed_precision(load_config("smoke", ["parallel.mixed_precision=bf16"]).parallel)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    launcher_mixed_precision(load_config("smoke").parallel)


def test_old_pickled_checkpoint_is_refused_with_its_path(tmp_path):
    import numpy as np

    from rlhflab.errors import StageError
    from rlhflab.parallel import load_state_file

    torch.save({"step": 1, "numpy": np.random.get_state()}, tmp_path / "state.pt")  # needs weights_only=False
    with pytest.raises(StageError, match="cannot read checkpoint .*state.pt"):
        load_state_file(tmp_path)


def test_engine_optimizer_loops_per_parameter_when_sharded_and_the_update_is_the_same():
    """Sharded models get AdamW's per-parameter loop (no foreach temporaries over every shard);
    unsharded PPO keeps the fused kernel. All three give the plain AdamW update up to rounding."""
    import dataclasses

    from rlhflab.config import OptimConfig

    engine = _engine()
    cfg = OptimConfig(lr=1e-2, eps=1e-5)
    assert engine.optimizer([torch.nn.Parameter(torch.zeros(3))], cfg, fused=True).defaults["fused"]
    sharded = dataclasses.replace(engine, mesh=object())  # only `wrapped` is read
    assert sharded.wrapped
    looped = sharded.optimizer([torch.nn.Parameter(torch.zeros(3))], cfg, fused=True)
    assert looped.defaults["foreach"] is False and not looped.defaults.get("fused")

    g = torch.Generator().manual_seed(0)
    init, grads = torch.randn(5, 7, generator=g), [torch.randn(5, 7, generator=g) for _ in range(3)]
    finals = []
    for make in (lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=1e-5, weight_decay=cfg.weight_decay),
                 lambda ps: sharded.optimizer(ps, cfg), lambda ps: engine.optimizer(ps, cfg, fused=True)):
        w = torch.nn.Parameter(init.clone())
        opt = make([w])
        for gr in grads:
            w.grad = gr.clone()
            opt.step()
        finals.append(w.detach())
    assert not torch.equal(finals[0], init)
    torch.testing.assert_close(finals[1], finals[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(finals[2], finals[0], rtol=0, atol=1e-6)
