"""Load test of the best-of-N server: bounded concurrent clients for a bounded time.

Starts the server in-process on 127.0.0.1 (a free port) with the given policy/RM directories,
or with tiny random demo models, then runs ``--concurrency`` clients that send requests
back to back for ``--duration`` seconds (a share ``--score-fraction`` of them to /v1/score,
the rest best-of-N completions), while a probe times GET /health every 0.2 s (the event loop
must stay responsive while generations run). Prints one JSON line: requests/s, p50/p95/max
latency, status counts, tokens/s, the /health latency under load and the count of 5xx, which
must be 0 (exit status 1 otherwise).

Clients and server share one process (and the GIL); on 2 CPU cores the numbers are a floor.

``--concurrency`` takes a list (``1,8,16``: one load run per value). ``--baseline-app FILE``
also loads another version of ``rlhflab/serve/app.py`` (e.g. the unbatched server of an older
commit: ``git show <commit>:src/rlhflab/serve/app.py > /tmp/app_old.py``) and runs the same
loads against it on the same model objects, alternating, so "before" and "after" share one
process and one machine state. One JSON line per (server, concurrency), then a table.

    python benchmarks/serve_load.py                                  # demo models, 8 clients, 30 s
    python benchmarks/serve_load.py --policy runs/tldr-synth/ppo/policy --reward runs/tldr-synth/rm/reward
    python benchmarks/serve_load.py --concurrency 1,8,16 --baseline-app /tmp/app_old.py
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import random
import sys
import time
from collections import Counter

import httpx

from rlhflab.serve.app import BackgroundServer, _quantile, create_app, demo_models

POSTS = [
    ("relationships", "my cat and my keyboard", "My cat sleeps on my keyboard every morning. Should I buy her a bed?"),
    ("personalfinance", "first paycheck", "I got my first paycheck and I do not know whether to save it or pay my loan."),
    ("AskReddit", "neighbour plays drums", "My neighbour plays drums at 2am. I asked him twice to stop. What now?"),
]


def stats_ms(values: list[float]) -> dict:
    v = sorted(values)
    if not v:
        return {"p50": None, "p95": None, "max": None}
    return {"p50": round(_quantile(v, 0.5), 1), "p95": round(_quantile(v, 0.95), 1), "max": round(v[-1], 1)}


async def run_load(url: str, concurrency: int, duration: float, best_of: int, max_tokens: int, temperature: float,
                   score_fraction: float, seed: int) -> dict:
    from rlhflab.data.tldr import format_query

    rng = random.Random(seed)
    prompts = [format_query(*p) for p in POSTS]
    latencies, statuses, transport_errors, health_ms = [], Counter(), Counter(), []
    tokens = 0
    stop_at = 0.0  # set when the clients start

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while time.perf_counter() < stop_at:
            prompt = rng.choice(prompts)
            if rng.random() < score_fraction:
                path, body = "/v1/score", {"prompt": prompt, "responses": [" a summary", " another one", " a third"]}
            else:
                path, body = "/v1/completions", {"prompt": prompt, "n": 1, "best_of": best_of, "max_tokens": max_tokens,
                                                 "temperature": temperature}
            t0 = time.perf_counter()
            try:
                r = await http.post(path, json=body)
            except httpx.HTTPError as e:
                transport_errors[type(e).__name__] += 1
                continue
            latencies.append((time.perf_counter() - t0) * 1000)
            statuses[r.status_code] += 1
            if r.status_code == 200 and path == "/v1/completions":
                tokens += r.json()["usage"]["completion_tokens"]

    async def probe(http: httpx.AsyncClient) -> None:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            r = await http.get("/health")
            if r.status_code == 200:
                health_ms.append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(0.2)

    limits = httpx.Limits(max_connections=concurrency + 1)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        t0 = time.perf_counter()
        stop_at = t0 + duration
        await asyncio.gather(probe(http), *(client(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    n = sum(statuses.values())
    return {
        "requests": n, "duration_s": round(elapsed, 2), "requests_per_s": round(n / elapsed, 2),
        "latency_ms": stats_ms(latencies), "status_counts": {str(k): v for k, v in sorted(statuses.items())},
        "errors_5xx": sum(v for k, v in statuses.items() if k >= 500), "transport_errors": dict(transport_errors),
        "completion_tokens_per_s": round(tokens / elapsed, 1), "health_latency_ms_under_load": stats_ms(health_ms),
    }


def server_counters(url: str) -> dict:
    """tokens generated and batches run, from /metrics (Prometheus text, or the older JSON)."""
    r = httpx.get(url + "/metrics", timeout=30)
    try:
        m = r.json()
        return {"server_tokens_generated": m.get("tokens_generated")}
    except ValueError:
        from prometheus_client.parser import text_string_to_metric_families

        vals = {s.name: s.value for f in text_string_to_metric_families(r.text) for s in f.samples if not s.labels}
        return {"server_tokens_generated": vals.get("rlhflab_generated_tokens_total"),
                "batches": vals.get("rlhflab_batch_rows_count"),
                "mean_rows_per_batch": round(vals["rlhflab_batch_rows_sum"] / vals["rlhflab_batch_rows_count"], 2)
                if vals.get("rlhflab_batch_rows_count") else None}


def load_app_module(path: str):
    spec = importlib.util.spec_from_file_location("rlhflab_serve_baseline_app", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", help="policy directory (default: tiny random demo models)")
    p.add_argument("--reward", help="reward model directory (with --policy)")
    p.add_argument("--concurrency", default="8", help="clients; a comma list runs one load per value")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load (per run)")
    p.add_argument("--best-of", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--score-fraction", type=float, default=0.2, help="share of requests sent to /v1/score")
    p.add_argument("--hidden-size", type=int, default=64, help="demo policy width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline-app", help="another serve/app.py to measure the same way (before/after)")
    p.add_argument("--max-batch-rows", type=int, default=32, help="batched server: rows per generation batch")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="batched server: wait for company")
    args = p.parse_args(argv)
    if bool(args.policy) != bool(args.reward):
        p.error("give both --policy and --reward, or neither (demo models)")
    levels = [int(x) for x in str(args.concurrency).split(",") if x.strip()]

    if args.policy:
        from rlhflab.models.policy import load_policy, load_tokenizer
        from rlhflab.models.reward import RewardModel

        policy, tok = load_policy(args.policy), load_tokenizer(args.policy, padding_side="left")
        reward = RewardModel.from_pretrained(args.reward)
        models = {"policy": args.policy, "reward": args.reward}
    else:
        policy, tok, reward = demo_models(seed=args.seed, hidden_size=args.hidden_size, num_layers=2)
        models = {"policy": f"demo llama h={args.hidden_size} L=2 (byte tokenizer)", "reward": "demo llama RM"}
    limits = dict(max_best_of=max(16, args.best_of), max_tokens=max(128, args.max_tokens))
    servers = [("batched", lambda: create_app(policy, reward, tokenizer=tok, max_batch_rows=args.max_batch_rows,
                                              max_wait_ms=args.max_wait_ms, **limits))]
    if args.baseline_app:
        old = load_app_module(args.baseline_app)
        servers.insert(0, ("baseline", lambda: old.create_app(policy, reward, tokenizer=tok, **limits)))

    rows, ok = [], True
    for c in levels:
        for name, make in servers:
            app = make()
            with BackgroundServer(app) as srv:
                result = asyncio.run(run_load(srv.url, c, args.duration, args.best_of, args.max_tokens,
                                              args.temperature, args.score_fraction, args.seed))
                result.update(server_counters(srv.url))
            result.update({"server": name, "device": str(app.state.models.device), **models, "concurrency": c,
                           "best_of": args.best_of, "max_tokens": args.max_tokens,
                           "score_fraction": args.score_fraction})
            print(json.dumps(result), flush=True)
            rows.append(result)
            ok = ok and result["errors_5xx"] == 0 and not result["transport_errors"]
    print("\n| server | clients | requests | req/s | p50 ms | p95 ms | 5xx | completion tok/s | batches (rows/batch) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        b = f"{int(r['batches'])} ({r['mean_rows_per_batch']})" if r.get("batches") else "-"
        print(f"| {r['server']} | {r['concurrency']} | {r['requests']} | {r['requests_per_s']} | {r['latency_ms']['p50']} "
              f"| {r['latency_ms']['p95']} | {r['errors_5xx']} | {r['completion_tokens_per_s']} | {b} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
