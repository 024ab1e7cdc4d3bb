"""SFT stage (rlhflab.stages.sft) and the shared stage helpers (rlhflab.stages.common)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rlhflab.config import ArchConfig
from rlhflab.data.collate import sft_batch
from rlhflab.data.errors import DataError
from rlhflab.data.tldr import SFTExample
from rlhflab.errors import StageError
from rlhflab.models.policy import build_policy
from rlhflab.runtime import read_jsonl
from rlhflab.stages import common, sft
from rlhflab.stages.common import StopRequested, global_batch_indices, micro_batches, process_slice


# ------------------------------------------------------------------------- helpers
def test_global_batch_order_is_a_seeded_permutation_per_epoch():
    n, B = 10, 4  # 2.0 epochs -> 5 steps; step 2 straddles the epoch boundary
    steps = [global_batch_indices(n, B, 2.0, seed=7, step=s) for s in range(5)]
    flat = [i for b in steps for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # each epoch has its own permutation
    assert steps == [global_batch_indices(n, B, 2.0, seed=7, step=s) for s in range(5)]  # pure
    assert steps != [global_batch_indices(n, B, 2.0, seed=8, step=s) for s in range(5)]
    assert common.num_steps(10, 4, 2.0) == 5 and common.num_steps(10, 4, 1.0) == 2


def test_process_slices_partition_the_global_batch():
    batch = list(range(12))
    parts = [process_slice(batch, p, 3) for p in range(3)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert micro_batches(parts[1], 2) == [[4, 5], [6, 7]]


@pytest.mark.parametrize("select_logits", [False, True])
def test_global_token_normalisation_matches_one_big_batch(select_logits):
    """Summing micro-batch token losses / the global target count gives the gradient of the
    token-mean loss over the whole batch (what N processes x accumulation must reproduce),
    whether or not the LM head runs only at the labelled positions."""
    tok = type("T", (), {"pad_token_id": 0, "eos_token_id": 1, "__len__": lambda self: 20})()
    model = build_policy(tok, arch=ArchConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                                              max_position_embeddings=32), seed=0)
    assert sft.supports_logits_to_keep(model)
    g = torch.Generator().manual_seed(0)
    ex = [SFTExample(str(i), "", torch.randint(2, 20, (3 + i,), generator=g).tolist(),
                     "", torch.randint(2, 20, (1 + 2 * i,), generator=g).tolist() + [1], "", "", "") for i in range(4)]
    whole = sft_batch(ex, 0)
    out = model(input_ids=whole["input_ids"], attention_mask=whole["attention_mask"].long(), labels=whole["labels"])
    out.loss.backward()  # HF: mean over all labelled tokens of the batch
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    n_targets = sum(sft.target_count(e, False) for e in ex)
    assert n_targets == 2 + 4 + 6 + 8
    total = 0.0
    for chunk in (ex[:1], ex[1:3], ex[3:]):  # uneven micro-batches, different paddings
        loss, n = sft.token_loss_sum(model, sft_batch(chunk, 0), select_logits)
        assert int(n) == sum(sft.target_count(e, False) for e in chunk)
        (loss / n_targets).backward()
        total += loss.item()
    assert total / n_targets == pytest.approx(out.loss.item(), rel=1e-5)
    for w, p in zip(want, model.parameters()):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-7)
    assert sft.target_count(ex[2], True) == len(ex[2].query_ids) + len(ex[2].response_ids) - 1


def test_rouge_l_hand_values():
    # LCS("a b c d", "a c d e") = "a c d": P = R = 3/4 -> F = 0.75
    assert sft.rouge_l(["a b c d", "x"], ["a c d e", "y"]) == pytest.approx([0.75, 0.0])


# ---------------------------------------------------------------------- the stage
def test_sft_trains_logs_and_saves_a_loadable_policy(smoke_sft_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = smoke_sft_run
    d = cfg.run_dir / "sft"
    rows = read_jsonl(d / "metrics.jsonl")
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))  # 64 examples / 16 x 2 epochs
    assert train[-1]["train/loss"] < train[0]["train/loss"] - 0.5
    assert {"lr", "epoch", "perf/tokens_per_s", "train/grad_norm"} <= set(train[0])
    assert train[0]["lr"] == pytest.approx(1e-2) and train[-1]["epoch"] == pytest.approx(2.0)
    final = json.loads((d / "metrics.json").read_text())
    for key in ("eval/loss", "eval/rougeL", "gold/score", "gold/reference", "gold/oracle", "time/wall_s"):
        assert isinstance(final[key], float), key
    assert final["eval/loss"] < train[0]["train/loss"]
    assert final["gold/oracle"] == json.loads((Path(cfg.data.dir) / "stats.json").read_text())["gold_mean"]["oracle"]
    assert final["data/train_examples"] == 64 and final["data/train_skipped"] == 0
    assert len(read_jsonl(d / "eval_samples.jsonl")) == cfg.sft.eval_samples
    assert list((cfg.run_dir / "tb" / "sft").glob("events.out.tfevents.*"))
    assert (cfg.run_dir / "config.yaml").exists()

    # Plain transformers loads it, and it reproduces the eval loss.
    model = AutoModelForCausalLM.from_pretrained(d / "policy")
    tok = AutoTokenizer.from_pretrained(d / "policy")
    assert tok.pad_token_id != tok.eos_token_id and model.config.vocab_size >= len(tok)
    from rlhflab.data.tldr import load_sft

    val, _ = load_sft(str(cfg.data.dir), "validation", tok, cfg.data.max_query_length, cfg.data.response_length)
    loss = sft.validation_loss(model, val, tok.pad_token_id, False, 8, torch.device("cpu"))
    assert loss == pytest.approx(final["eval/loss"], rel=1e-5)


def test_finished_stage_is_skipped(smoke_sft_run):
    out = sft.main(smoke_sft_run)
    assert out["skipped"] is True and out["step"] == 8


def test_resume_reaches_the_same_weights(smoke_sft_run, smoke_cfg, monkeypatch):
    from safetensors.torch import load_file

    cfg = smoke_cfg()
    monkeypatch.setenv(common.STOP_ENV, "3")  # save_every=2, so the stop forces its own checkpoint at 3
    with pytest.raises(StopRequested, match="step 3"):
        sft.main(cfg)
    monkeypatch.delenv(common.STOP_ENV)
    assert (cfg.run_dir / "sft" / "state" / "ckpt-00000003" / "state.pt").exists()
    with pytest.raises(StageError, match="--resume"):
        sft.main(cfg)  # an unfinished run is not silently restarted
    with pytest.raises(StageError, match=r"sft\.optim\.lr: 0\.01 -> 0\.02"):
        sft.main(smoke_cfg("sft.optim.lr=0.02"), resume=True)  # nor continued under other settings
    sft.main(cfg, resume=True)
    want = load_file(smoke_sft_run.run_dir / "sft" / "policy" / "model.safetensors")
    got = load_file(cfg.run_dir / "sft" / "policy" / "model.safetensors")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    a = [(r["step"], r["train/loss"]) for r in read_jsonl(smoke_sft_run.run_dir / "sft" / "metrics.jsonl") if "train/loss" in r]
    b = [(r["step"], r["train/loss"]) for r in read_jsonl(cfg.run_dir / "sft" / "metrics.jsonl") if "train/loss" in r]
    assert a == b  # one history per step: the resumed log replaced nothing twice


def test_malformed_data_names_file_and_row_or_is_counted(smoke_cfg, synth_data_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_data_dir, data)
    train = data / "sft" / "train.jsonl"
    lines = train.read_text().splitlines()
    lines[5] = lines[5][:40]  # a truncated JSON line
    train.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"sft/train\.jsonl: row 5: invalid JSON"):
        sft.main(smoke_cfg(f"data.dir={data}"))
    out = sft.main(smoke_cfg(f"data.dir={data}", "data.skip_bad_rows=true", "sft.epochs=1", "sft.eval_samples=0"))
    assert out["data/train_skipped"] == 1 and out["data/train_examples"] == 63
    assert out["data/skip_reasons"]["train"] == {"bad JSON": 1}


def test_too_little_data_is_a_clear_error(smoke_cfg):
    with pytest.raises(StageError, match="less than one batch"):
        sft.main(smoke_cfg("sft.batch_size=128", "sft.micro_batch_size=8", "sft.epochs=1"))


def test_ensure_data_generates_once_and_refuses_other_settings(tmp_path):
    from rlhflab.config import load_config

    cfg = load_config("smoke", [f"out_dir={tmp_path}", "data.synth.n_sft_train=8", "data.synth.n_sft_validation=2",
                                "data.synth.n_sft_test=2", "data.synth.n_pref_train=4", "data.synth.n_pref_validation=2"])
    root = common.ensure_data(cfg, progress=False)
    assert root == tmp_path / "smoke" / "data"
    assert len((root / "sft" / "train.jsonl").read_text().splitlines()) == 8
    stamp = (root / "stats.json").stat().st_mtime_ns
    assert common.ensure_data(cfg, progress=False) == root and (root / "stats.json").stat().st_mtime_ns == stamp
    other = load_config("smoke", [f"out_dir={tmp_path}", "data.synth.n_sft_train=9"])
    with pytest.raises(StageError, match="n_sft_train"):
        common.ensure_data(other, progress=False)
    assert common.policy_tokenizer(cfg).pad_token_id is not None
    # A folder stamped before a SynthConfig key existed (pair_writers) was made at that key's default:
    # it is reused, and refused only when the setting asks for something else.
    marker = root / common.SYNTH_MARKER
    stamped = json.loads(marker.read_text())
    del stamped["pair_writers"]
    marker.write_text(json.dumps(stamped))
    assert common.ensure_data(cfg, progress=False) == root
    mixed = load_config("smoke", [f"out_dir={tmp_path}", "data.synth.n_sft_train=8", "data.synth.n_sft_validation=2",
                                  "data.synth.n_sft_test=2", "data.synth.n_pref_train=4", "data.synth.n_pref_validation=2",
                                  "data.synth.pair_writers={halluc: 0.3}"])
    with pytest.raises(StageError, match="pair_writers"):
        common.ensure_data(mixed, progress=False)
