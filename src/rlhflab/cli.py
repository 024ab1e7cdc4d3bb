"""Command line: ``rlhflab {data,sft,rm,ppo,eval,report,serve,run,config}``.

Stage commands share one config tree: ``--config FILE`` (a YAML file or a built-in
config name such as ``default`` or ``smoke``) plus ``key.sub=value`` overrides, e.g.
``rlhflab sft --config default sft.optim.lr=1e-4``. The config is validated before any
compute; errors name the offending key and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from typing import Callable, Optional

from rlhflab.config import ConfigError, RunConfig, builtin_configs, describe, load_config

EPILOG_OVERRIDES = "Overrides: any number of key.sub=value pairs after the options, e.g. sft.optim.lr=1e-4 name=myrun. See `rlhflab config show` for every key."


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default="default",
                   help=f"YAML config file or built-in name ({', '.join(builtin_configs()) or 'default'}); default: %(default)s")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. ppo.kl_coef=0.1")


def _cfg(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, args.overrides)


# ------------------------------------------------------------------------ handlers
def _cmd_data_synth(args: argparse.Namespace) -> int:
    from rlhflab.config import SynthConfig
    from rlhflab.data.tldr_synth import synthesize

    base = _cfg(args).data.synth.model_dump()
    for key in ("seed", "n_sft_train", "n_sft_validation", "n_sft_test", "n_pref_train", "n_pref_validation",
                "labeler_tau", "labeler_len_beta", "vocab_size"):
        v = getattr(args, key)
        if v is not None:
            base[key] = v
    try:
        scfg = SynthConfig.model_validate(base)
    except Exception as e:  # pydantic ValidationError -> readable
        raise ConfigError(f"invalid synth option: {e}") from None
    stats = synthesize(args.out, scfg, progress=not args.quiet)
    print(json.dumps(stats, indent=2))
    return 0


def _stage(module: str, fn: str = "main") -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import importlib

        cfg = _cfg(args)  # validate before importing torch-heavy stage code
        mod = importlib.import_module(module)
        kwargs = {k: getattr(args, k) for k in ("resume",) if hasattr(args, k)}
        result = getattr(mod, fn)(cfg, **kwargs)
        if isinstance(result, dict):
            print(json.dumps(result, indent=2, default=str))
        return 0

    return run


def _cmd_config_show(args: argparse.Namespace) -> int:
    cfg = _cfg(args)  # validates the file and overrides even when only listing keys
    if args.resolved:
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    rows = describe(cfg)
    width = max(len(r[0]) for r in rows)
    print(f"{'key':<{width}}  {'type':<28} {'value':<14} doc")
    for key, typ, value, doc in rows:
        print(f"{key:<{width}}  {typ:<28} {value:<14} {doc}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from rlhflab.plan import PlanError, PlanInputs, format_table, plan

    cfg = _cfg(args)
    stages = tuple(args.stage) if args.stage else ("sft", "rm", "ppo")
    try:
        plans = plan(cfg, gpus=args.gpus, gpu_mem_gb=args.gpu_mem, stages=stages, device=args.device)
        x = PlanInputs.from_config(cfg, gpus=args.gpus, device=args.device)
    except PlanError as e:
        raise ConfigError(str(e)) from None
    if args.json:
        print(json.dumps({"config": args.config, "gpus": args.gpus, "gpu_mem_gb": args.gpu_mem,
                          "stages": [sp.as_dict() for sp in plans]}, indent=2))
    else:
        print(format_table(plans, x))
    return 0 if all(sp.fits is not False for sp in plans) else 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhflab",
        description=textwrap.dedent("""\
            rlhflab: the RLHF pipeline of Huang et al. 2024 — SFT -> Bradley-Terry reward model ->
            PPO (per-token KL, GAE, value function) -> evaluation and report -> best-of-N serving.
            The default config runs the built-in known-answer task tldr-synth on a CPU in minutes."""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from rlhflab import __version__

    parser.add_argument("--version", action="version", version=f"rlhflab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # data
    p_data = sub.add_parser("data", help="generate or inspect datasets")
    data_sub = p_data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    p_synth = data_sub.add_parser(
        "synth", help="write the tldr-synth known-answer task (SFT + preference data, tokenizer, stats.json)",
        description="Writes DIR/sft/{train,validation,test}.jsonl (TL;DR SFT columns), DIR/preference/{train,validation}.jsonl "
                    "(openai/summarize_from_feedback comparisons schema + chosen/rejected), DIR/tokenizer/ and DIR/stats.json. "
                    "Deterministic per seed.",
        epilog=EPILOG_OVERRIDES)
    p_synth.add_argument("--out", required=True, help="output directory")
    p_synth.add_argument("--seed", type=int, help="generator seed (default: data.synth.seed)")
    for key, typ, hlp in [("n_sft_train", int, "SFT train posts"), ("n_sft_validation", int, "SFT validation posts"),
                          ("n_sft_test", int, "SFT test posts"), ("n_pref_train", int, "train comparisons"),
                          ("n_pref_validation", int, "validation comparisons"), ("labeler_tau", float, "labeler noise tau"),
                          ("labeler_len_beta", float, "labeler length bias per word"), ("vocab_size", int, "BPE vocabulary size")]:
        p_synth.add_argument("--" + key.replace("_", "-"), dest=key, type=typ, help=hlp)
    p_synth.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_args(p_synth)
    p_synth.set_defaults(func=_cmd_data_synth)

    stages = [
        ("sft", "rlhflab.stages.sft", "supervised fine-tuning on (query, reference summary) pairs",
         "Trains the policy on query -> ' {summary}<eos>' with the loss on response tokens; validates loss, ROUGE-L and (tldr-synth) gold score. Writes <run>/sft/."),
        ("rm", "rlhflab.stages.rm", "train the Bradley-Terry reward model on preference pairs",
         "Loss -logsigmoid(r_chosen - r_rejected), score at the last real token; backbone = SFT policy, MiniLM or any HF model. Writes <run>/rm/."),
        ("ppo", "rlhflab.stages.ppo", "PPO against the reward model with a per-token KL penalty to the SFT policy",
         "Rollout -> score -> KL-shaped rewards -> GAE -> PPO epochs x minibatches. Writes <run>/ppo/, checkpoints atomically; --resume continues."),
        ("eval", "rlhflab.stages.evaluate", "evaluate SFT/PPO policies: win rates with CIs, ROUGE-L, reward-hacking signals",
         "Generates summaries for validation/test posts and judges them (gold judge on tldr-synth, optional LLM judge). Writes <run>/eval/."),
        ("overopt", "rlhflab.stages.overopt", "over-optimisation curves: gold and RM score vs KL for best-of-N and PPO (Gao et al. 2022)",
         "tldr-synth: best-of-n (n = 1..overopt.pool_size) from the SFT policy and every PPO snapshot (ppo.snapshot_every), "
         "gold and proxy vs d = sqrt(KL), Gao's functional forms fitted with bootstrap CIs. Writes <run>/overopt/."),
    ]
    for name, module, hlp, desc in stages:
        p = sub.add_parser(name, help=hlp, description=desc, epilog=EPILOG_OVERRIDES)
        _add_config_args(p)
        if name in ("sft", "rm", "ppo"):
            p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run directory")
        p.set_defaults(func=_stage(module))
        if name == "eval":
            p.add_argument("--policy", action="append", default=[], metavar="[NAME=]DIR",
                           help="also evaluate this HF policy folder (repeatable; named after the folder unless NAME= is given)")
            p.add_argument("--only", action="store_true", help="evaluate only the --policy folders, not <run>/sft and <run>/ppo")
            p.add_argument("--reward", metavar="DIR", help="reward model folder of the 'rm' judge (default: reward.sources / <run>/rm/reward)")
            p.set_defaults(func=_cmd_eval)

    p_run = sub.add_parser("run", help="the whole pipeline: data -> sft -> rm -> ppo -> eval -> report",
                           description="Runs every stage, skipping finished ones (resumable stage by stage), and writes <run>/summary.json and <run>/report.html.",
                           epilog=EPILOG_OVERRIDES)
    _add_config_args(p_run)
    p_run.add_argument("--out", help="parent directory of the run (overrides out_dir)")
    p_run.add_argument("--seeds", type=int, default=1, help="repeat the stochastic stages for N seeds and report mean ± std")
    p_run.add_argument("--overopt", action="store_true", help="also run `rlhflab overopt` after eval (minutes: see README)")
    p_run.set_defaults(func=_cmd_run)

    p_report = sub.add_parser("report", help="render RUN_DIR/report.html (self-contained, plots embedded)")
    p_report.add_argument("run_dir", help="a run directory, e.g. runs/tldr-synth")
    p_report.add_argument("--out", help="output HTML path (default: RUN_DIR/report.html)")
    p_report.set_defaults(func=_cmd_report)

    p_serve = sub.add_parser("serve", help="serve best-of-N completions and RM scores over HTTP (OpenAI-compatible)")
    p_serve.add_argument("--policy", required=True, help="policy model directory (e.g. runs/tldr-synth/ppo/policy)")
    p_serve.add_argument("--reward", required=True, help="reward model directory (e.g. runs/tldr-synth/rm/reward)")
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--port", type=int, default=8000)
    p_serve.add_argument("--api-key-env", default=None, help="environment variable holding a bearer API key (unset: no auth)")
    p_serve.add_argument("--max-best-of", type=int, default=16, help="largest best_of accepted")
    p_serve.add_argument("--max-tokens", type=int, default=128, help="largest max_tokens accepted")
    p_serve.add_argument("--max-prompt-tokens", type=int, default=512, help="longest prompt accepted, in policy tokens")
    p_serve.add_argument("--max-body-bytes", type=int, default=64 * 1024, help="largest request body accepted")
    p_serve.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p_serve.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                         help="model weights dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p_serve.add_argument("--max-batch-rows", type=int, default=32,
                         help="most candidates (rows) per generation batch; concurrent requests share batches")
    p_serve.add_argument("--max-wait-ms", type=float, default=10.0,
                         help="how long the first queued request waits for others to join its batch")
    p_serve.add_argument("--max-queue", type=int, default=256, help="requests allowed to wait (429 beyond)")
    p_serve.add_argument("--request-timeout", type=float, default=120.0, help="seconds before a request is stopped (503)")
    p_serve.set_defaults(func=_cmd_serve)

    p_env = sub.add_parser("env", help="print versions, devices, CPU flags and threads (paste it into bug reports)")
    p_env.add_argument("--json", action="store_true", help="machine-readable output")
    p_env.set_defaults(func=_cmd_env)
    p_plan = sub.add_parser(
        "plan", help="predict the per-device peak memory of each stage; say whether it fits and which knob to turn",
        description="Pure computation from the config (no model is built, no network): weights, gradients, AdamW "
                    "states, activations (with/without gradient checkpointing), logits, KV cache, frozen models, per "
                    "device. Exit status 3 when a stage does not fit in --gpu-mem.",
        epilog=EPILOG_OVERRIDES)
    _add_config_args(p_plan)
    p_plan.add_argument("--gpus", type=int, default=1, help="devices (= processes) the run uses; default: %(default)s")
    p_plan.add_argument("--gpu-mem", type=float, default=None, metavar="GB", help="memory per device in GiB, e.g. 80")
    p_plan.add_argument("--stage", action="append", choices=["sft", "rm", "ppo"], help="plan only this stage (repeatable)")
    p_plan.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="device kind (default: %(default)s)")
    p_plan.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p_plan.set_defaults(func=_cmd_plan)

    p_cfg = sub.add_parser("config", help="show config keys with types, defaults and docs")
    cfg_sub = p_cfg.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    p_show = cfg_sub.add_parser("show", help="list every key (or --resolved: print the resolved YAML)")
    p_show.add_argument("--resolved", action="store_true", help="print the resolved config for --config + overrides")
    _add_config_args(p_show)
    p_show.set_defaults(func=_cmd_config_show)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from rlhflab.pipeline import STAGES, run_pipeline

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"out_dir={args.out}")
    stages = STAGES + ("overopt",) if args.overopt else STAGES
    summary = run_pipeline(load_config(args.config, overrides), seeds=args.seeds, stages=stages)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    cfg = _cfg(args)  # validate before importing torch-heavy stage code
    from rlhflab.stages.evaluate import main as evaluate, policy_names

    result = evaluate(cfg, policies=policy_names(args.policy), include_defaults=not args.only, reward_path=args.reward)
    print(json.dumps(result, indent=2, default=str))
    return 0


def _cmd_env(args: argparse.Namespace) -> int:
    from rlhflab.envinfo import collect, format_text

    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rlhflab.errors import StageError

    if not Path(args.run_dir).is_dir():
        raise StageError(f"run directory not found: {args.run_dir} (pass a folder written by `rlhflab run`, "
                         "e.g. runs/tldr-synth)")
    from rlhflab.report.html import render_report

    path = render_report(args.run_dir, out=args.out)
    print(f"report written to {path}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from rlhflab.extras import require

    require("serve")
    from rlhflab.serve.app import serve

    serve(policy=args.policy, reward=args.reward, host=args.host, port=args.port, api_key_env=args.api_key_env,
          max_best_of=args.max_best_of, max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
          max_body_bytes=args.max_body_bytes, device=args.device, dtype=args.dtype,
          max_batch_rows=args.max_batch_rows, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
          request_timeout_s=args.request_timeout)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        # `rlhflab`, `rlhflab data`, `rlhflab config` without a subcommand: show the relevant help.
        target = {"data": "data", "config": "config"}.get(args.command or "")
        if target:
            parser.parse_args([target, "--help"])
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"rlhflab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlhflab: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        from rlhflab.runtime import WRITE_ERRNOS

        if e.errno in WRITE_ERRNOS:  # a full disk or read-only output folder is the user's to fix, not a bug
            print(f"rlhflab: error: cannot write {e.filename or 'the output'}: {e.strerror} "
                  "(is the output folder read-only or the disk full?)", file=sys.stderr)
        elif isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
            print(f"rlhflab: error: {e}", file=sys.stderr)  # a path the user gave: a message, not a traceback
        else:
            raise
        return 1
    except Exception as e:  # user-facing errors from the data layer and stages
        # Errors defined by rlhflab (DataError, JudgeError, StageError, ...) are messages for the
        # user, not bugs: print them without a traceback. Anything else is a bug and propagates.
        if type(e).__module__.startswith("rlhflab."):
            print(f"rlhflab: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
