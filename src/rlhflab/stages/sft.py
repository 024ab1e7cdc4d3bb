"""Supervised fine-tuning: the policy learns query -> ``" {summary}<eos>"`` (Huang et al. 2024, SFT stage).

``rlhflab sft --config default`` runs :func:`main`, which reads top to bottom:

1. run folder: a finished stage (``sft/policy/`` + ``sft/metrics.json``) is skipped and its
   metrics returned; an unfinished one with a checkpoint needs ``--resume``;
2. data: tldr-synth generated if absent; train/validation splits through Huang's
   preprocessing (``data.tldr.load_sft``), bad rows refused or counted;
3. model (``build_policy``), AdamW (eps 1e-5) and a cosine schedule with warmup;
4. resume from ``sft/state/`` (weights, optimizer, scheduler, RNG, step);
5. the loop: each global batch is a slice of a seeded permutation; every process takes its
   contiguous share and accumulates gradients over micro-batches; the loss is the sum of
   token losses divided by the number of target tokens of the *global* batch, so one process
   and N processes with the same global batch take the same step;
6. validation (every ``sft.eval_every`` steps and at the end): loss, ROUGE-L of near-greedy
   summaries against the references and, on tldr-synth, their gold score beside the gold
   score of the references and of the oracle summaries;
7. outputs: ``sft/policy/`` (``save_pretrained`` + tokenizer), ``metrics.jsonl``,
   ``metrics.json``, TensorBoard under ``tb/sft``, ``eval_samples.jsonl``.

Only the main process writes files. Many processes: ``accelerate launch --multi_gpu
--num_processes N -m rlhflab.cli sft ...`` (on a machine without CUDA this starts N CPU
processes over gloo; ``accelerate launch --cpu --num_processes N`` starts only ONE process).
"""

from __future__ import annotations

import inspect
import json
import time
from typing import Sequence

import torch
import torch.nn.functional as F

from rlhflab.config import RunConfig, derive_batch, save_config
from rlhflab.data.collate import IGNORE_INDEX, sft_batch
from rlhflab.data.formats import load_sft_data
from rlhflab.data.tldr import SFTExample
from rlhflab.errors import StageError
from rlhflab.models.card import write_model_card
from rlhflab.models.generation import generate_texts
from rlhflab.models.lora import apply_lora, lora_active, save_outputs
from rlhflab.models.policy import build_policy, count_parameters
from rlhflab.parallel import make_engine, optimizer_params
from rlhflab.runtime import CheckpointManager, atomic_save_dir, progress, rng_state, seed_everything, write_json
from rlhflab.trackers import make_logger
from rlhflab.stages.common import (
    StopRequested,
    check_resume_config,
    ensure_data,
    global_batch_indices,
    load_train_state,
    restore_optimization,
    make_accelerator,
    make_scheduler,
    micro_batches,
    num_steps,
    policy_tokenizer,
    prepare_stage_dir,
    process_slice,
    stage_dirs,
    stop_after_step,
    synth_stats,
    training_config,
)


def target_count(example: SFTExample, loss_on_query: bool) -> int:
    """Tokens of one example that carry a loss: the response (with EOS), or with
    ``loss_on_query`` every token but the first (nothing predicts it)."""
    n = len(example.response_ids)
    return n + len(example.query_ids) - 1 if loss_on_query else n


def supports_logits_to_keep(model) -> bool:
    """Whether the (unwrapped) causal LM's forward takes ``logits_to_keep`` (Llama, GPT-NeoX, GPT-2 in transformers 5)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def token_loss_sum(model, batch: dict[str, torch.Tensor], select_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over labelled positions, and their count.

    ``batch``: ``input_ids``/``attention_mask``/``labels`` [B, T], right-padded (``data.collate.sft_batch``),
    so default position ids are right. Returns (loss_sum [], n_targets []).
    ``select_logits``: project only the positions that predict a label onto the vocabulary
    (``logits_to_keep`` as a [B, T] bool mask); with the loss on the response only this skips
    the LM head on every query token (~30% of a step for the default model), same numbers.
    """
    labels = batch["labels"][:, 1:]  # position t predicts token t+1
    targets = labels != IGNORE_INDEX
    kwargs = {}
    if select_logits:
        keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
        keep[:, :-1] = targets
        kwargs["logits_to_keep"] = keep
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long(), use_cache=False,
                   **kwargs).logits
    logits = logits.float() if select_logits else logits[:, :-1][targets].float()  # [N, V], row-major order
    loss = F.cross_entropy(logits, labels[targets], reduction="sum")
    return loss, targets.sum()


@torch.no_grad()
def validation_loss(model, examples: Sequence[SFTExample], pad_id: int, loss_on_query: bool, batch_size: int,
                    device: torch.device) -> float:
    """Mean next-token loss per target token over ``examples``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in micro_batches(list(examples), batch_size):
        batch = {k: v.to(device) for k, v in sft_batch(chunk, pad_id, loss_on_query).items()}
        loss, n = token_loss_sum(model, batch, select_logits=supports_logits_to_keep(model))
        total += loss.item()
        count += int(n)
    model.train(was_training)
    return total / max(count, 1)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 of each prediction against its reference (rouge-score, with stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]


def evaluate_policy(model, tokenizer, examples: Sequence[SFTExample], cfg: RunConfig, device: torch.device,
                    gen_batch_size: int = 64, seed: int = 0) -> tuple[dict, list[dict]]:
    """Validation of an SFT policy on ``examples`` (the first ``sft.eval_samples`` get summaries).

    Returns (metrics, samples): ``eval/loss``, ``eval/rougeL``, ``eval/response_length_mean``
    (tokens), ``eval/no_eos_rate`` and on tldr-synth ``gold/score`` (the summaries),
    ``gold/reference`` (the reference summaries of the same posts) and ``gold/oracle``
    (``stats.json``); samples are per-post dicts for ``eval_samples.jsonl``.
    Sampling runs under a forked RNG seeded with ``seed``, so it never shifts training randomness.
    """
    s = cfg.sft
    metrics = {"eval/loss": validation_loss(model, examples, tokenizer.pad_token_id, s.loss_on_query,
                                            2 * s.micro_batch_size, device)}
    subset = list(examples[: s.eval_samples])
    if not subset:
        return metrics, []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ids, texts, has_eos = generate_texts(model, tokenizer, [e.query_ids for e in subset], cfg.data.response_length,
                                             s.eval_temperature, batch_size=gen_batch_size)
    references = [e.response.strip() for e in subset]
    rouge = rouge_l(texts, references)
    metrics["eval/rougeL"] = sum(rouge) / len(rouge)
    metrics["eval/response_length_mean"] = sum(len(x) for x in ids) / len(ids)
    metrics["eval/no_eos_rate"] = 1.0 - sum(has_eos) / len(has_eos)
    samples = [{"id": e.id, "reference": r, "summary": t, "rougeL": g, "has_eos": h}
               for e, r, t, g, h in zip(subset, references, texts, rouge, has_eos)]
    if cfg.data.task == "tldr-synth":
        from rlhflab.data.tldr_synth import gold_scores

        posts = [e.post for e in subset]
        gold = gold_scores(posts, [t.strip() for t in texts])
        gold_ref = gold_scores(posts, references)
        metrics["gold/score"] = sum(gold) / len(gold)
        metrics["gold/reference"] = sum(gold_ref) / len(gold_ref)
        oracle = (synth_stats(cfg).get("gold_mean") or {}).get("oracle")
        if oracle is not None:
            metrics["gold/oracle"] = float(oracle)
        for row, g, gr in zip(samples, gold, gold_ref):
            row["gold"], row["gold_reference"] = g, gr
    return metrics, samples


def main(cfg: RunConfig, resume: bool = False, force: bool = False) -> dict:
    """Run (or resume) SFT; returns the final metrics (also written to ``<run>/sft/metrics.json``).

    ``resume``: continue from ``sft/state/`` (a fresh start when there is no checkpoint).
    ``force``: delete ``<run>/sft`` and retrain even when finished. Without either, a finished
    stage is skipped (its metrics returned with ``"skipped": true``) and an unfinished one
    with a checkpoint is refused with a message naming ``--resume``.
    """
    t_start = time.time()
    s = cfg.sft
    # 1. Accelerator and run folder. -------------------------------------------------
    accelerator = make_accelerator()
    engine = make_engine(cfg, accelerator)  # sharding, precision, checkpoints (rlhflab.parallel)
    is_main = accelerator.is_main_process
    stage_dir, tb_dir = stage_dirs(cfg, "sft")
    done = prepare_stage_dir(stage_dir, "policy", resume=resume, force=force, is_main=is_main)
    if done is not None:
        return done
    accelerator.wait_for_everyone()
    sizes = derive_batch("sft", s.batch_size, s.micro_batch_size, accelerator.num_processes)
    if is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg.run_dir / "config.yaml")

    # 2. Data: Huang's query format and truncation, " {summary}<eos>" responses. -------
    ensure_data(cfg, progress=is_main)
    tokenizer = policy_tokenizer(cfg)
    train, train_skips = load_sft_data(cfg, "train", tokenizer)  # data.task dispatch: TL;DR or TRL formats
    val, val_skips = load_sft_data(cfg, "validation", tokenizer)
    total_steps = num_steps(len(train), s.batch_size, s.epochs)
    if total_steps < 1:
        raise StageError(f"sft: {len(train)} usable train examples x sft.epochs={s.epochs} is less than one batch "
                         f"(sft.batch_size={s.batch_size})")

    # 3. Model (dtype, checkpointing, FSDP2 units: engine.prepare), AdamW (eps=1e-5, Huang),
    #    cosine schedule with warmup. -------------------------------------------------------
    seed_everything(s.seed)
    model = build_policy(tokenizer, cfg.model.policy, cfg.model.arch, seed=s.seed)
    n_params = count_parameters(model)
    lora = lora_active(cfg.model.lora, "sft")
    if lora:  # only the adapters train (model.lora)
        if engine.wrapped:
            raise StageError("model.lora with several processes is not supported yet (peft adapters are not wired "
                             "into the FSDP2 engine); run LoRA on one process")
        base_path = cfg.model.policy
        if base_path is None:  # a from-scratch base exists nowhere else: keep it, so sft/policy_adapter stays usable
            base_path = stage_dir / "base"
            if is_main and not (base_path / "config.json").is_file():
                atomic_save_dir(base_path, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
        model = apply_lora(model, cfg.model.lora, "causal", base_path=base_path)
    model = engine.prepare(model)
    optimizer = engine.optimizer([q for q in model.parameters() if q.requires_grad], s.optim)
    # Not passed through accelerator.prepare: its scheduler wrapper steps once per process.
    scheduler = make_scheduler(optimizer, "cosine", total_steps, s.optim.warmup_ratio)

    # 4. Resume: weights and optimizer state (sharded when the model is), scheduler, RNG, step. ----
    ckpts = CheckpointManager(stage_dir / "state")
    latest = ckpts.latest() if resume else None
    start_step, elapsed_before = 0, 0.0
    if latest is not None:
        check_resume_config(load_train_state(latest).get("config"), cfg, "sft", latest)
        state = engine.load_checkpoint(latest, {"model": model}, optimizer)
        start_step, elapsed_before = restore_optimization(state, optimizer, scheduler)
        del state

    logger = make_logger(cfg, "sft", stage_dir, tb_dir, enabled=is_main, resume_step=start_step if start_step else None)
    stop_at = stop_after_step()
    device = accelerator.device
    pad_id = tokenizer.pad_token_id
    select_logits = supports_logits_to_keep(model)
    bar = progress(total_steps, "sft", enabled=is_main)
    bar.update(start_step)
    last: dict = {}

    # 5. Training loop. ----------------------------------------------------------------
    model.train()
    for step in range(start_step + 1, total_steps + 1):
        t0 = time.time()
        global_ids = global_batch_indices(len(train), s.batch_size, s.epochs, s.seed, step - 1)
        global_examples = [train[i] for i in global_ids]
        # Same denominator on every process: the target tokens of the whole global batch.
        n_targets = sum(target_count(e, s.loss_on_query) for e in global_examples)
        local = process_slice(global_examples, accelerator.process_index, accelerator.num_processes)
        chunks = micro_batches(local, s.micro_batch_size)
        loss_sum = torch.zeros((), device=device)
        for k, chunk in enumerate(chunks):
            batch = {key: v.to(device) for key, v in sft_batch(chunk, pad_id, s.loss_on_query).items()}
            # Gradients are averaged over processes (synced on the last micro-batch); x num_processes
            # turns that back into a global sum.
            with engine.gradient_sync(model, sync=k == len(chunks) - 1):
                with engine.autocast():
                    loss, _ = token_loss_sum(model, batch, select_logits)
                accelerator.backward(loss * (accelerator.num_processes / n_targets))
            loss_sum += loss.detach()
        grad_norm = None
        if s.optim.max_grad_norm > 0:
            grad_norm = engine.clip_grad_norm_(optimizer_params(optimizer), s.optim.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        train_loss = accelerator.reduce(loss_sum, "sum").item() / n_targets
        tokens = sum(len(e.query_ids) + len(e.response_ids) for e in global_examples)
        last = {"train/loss": train_loss, "lr": lr, "epoch": step * s.batch_size / len(train),
                "perf/tokens_per_s": tokens / max(time.time() - t0, 1e-9)}
        if grad_norm is not None:
            last["train/grad_norm"] = float(grad_norm)
        if step % s.log_every == 0 or step == total_steps:
            logger.log(step, last)
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.3f}")

        # 6. Validation every eval_every steps (the final one runs after the loop); a wrapped
        #    model's forward needs every process, so then all run it (the same numbers) and the main one logs.
        if s.eval_every and step % s.eval_every == 0 and step < total_steps:
            if is_main or engine.wrapped:
                metrics, _ = evaluate_policy(model, tokenizer, val, cfg, device, seed=s.seed)
                logger.log(step, metrics)
            accelerator.wait_for_everyone()

        # Checkpoint every save_every steps and at the end (a crash in the final validation resumes there).
        stopping = stop_at is not None and step >= stop_at
        if (s.save_every and step % s.save_every == 0) or step == total_steps or stopping:
            engine.save_checkpoint(ckpts, step, {"model": model}, optimizer,
                                   {"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(),
                                    "elapsed_s": elapsed_before + time.time() - t_start,
                                    "config": training_config(cfg, "sft")})
        if stopping and step < total_steps:
            bar.close()
            logger.close()
            raise StopRequested(f"sft stopped after step {step} (RLHFLAB_STOP_AFTER_STEP); continue with --resume")
    bar.close()

    # 6. Final validation and 7. outputs (written by the main process; every process takes part in
    #    a wrapped model's forwards and in gathering its full weights). --------------------------
    result: dict = {}
    if is_main or engine.wrapped:
        metrics, samples = evaluate_policy(model, tokenizer, val, cfg, device, seed=s.seed)
    if is_main:
        logger.log(total_steps, metrics)
    logger.close()

    outputs: dict = {}
    if lora:  # sft/policy (merged when LoRA trained, model.lora.merge_on_save) and sft/policy_adapter
        if is_main:
            outputs = save_outputs(model, tokenizer, stage_dir, "policy", cfg.model.lora, atomic_save_dir)
            if (stage_dir / "policy").is_dir():
                write_model_card(stage_dir / "policy", cfg, "sft", metrics, base_model=cfg.model.policy)
    else:
        def write_policy(tmp, state_dict):
            model.save_pretrained(tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
            write_model_card(tmp, cfg, "sft", metrics, base_model=cfg.model.policy)

        engine.save_final(stage_dir / "policy", model, write_policy)
    if is_main:
        with open(stage_dir / "eval_samples.jsonl", "w") as f:
            for row in samples:
                f.write(json.dumps(row) + "\n")
        result = {
            "step": total_steps, **{k: v for k, v in last.items() if k != "perf/tokens_per_s"}, **metrics,
            "data/train_examples": len(train), "data/validation_examples": len(val),
            "data/train_skipped": train_skips.total, "data/validation_skipped": val_skips.total,
            "data/skip_reasons": {"train": dict(train_skips.counts), "validation": dict(val_skips.counts)},
            "model/parameters": n_params, "num_processes": accelerator.num_processes,
            "batch/grad_accum": sizes.grad_accum, "time/wall_s": round(elapsed_before + time.time() - t_start, 2),
            "policy_dir": str(stage_dir / "policy"), "lora": lora_active(cfg.model.lora, "sft"), **outputs,
            "model/trainable_parameters": sum(q.numel() for q in model.parameters() if q.requires_grad),
        }
        write_json(stage_dir / "metrics.json", result)  # last: its presence marks the stage finished
    accelerator.wait_for_everyone()
    if not is_main:
        result = json.loads((stage_dir / "metrics.json").read_text())
    return result
