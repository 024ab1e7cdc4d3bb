"""Time one PPO batch of scores from each reward source (rlhflab.rewards.score).

The same 64 (query, response) pairs, 64 distinct queries, scored by: the trained RM in process;
the same RM behind `rlhflab serve` on loopback (protocol rlhflab: one request per distinct
prompt); a Python function; the tldr-synth gold judge. Demo models (hidden 64, 2 layers,
byte tokenizer), CPU, one torch thread. Prints the median of 5 repeats per source, in ms.

    PYTHONPATH=src python benchmarks/reward_sources.py
"""
from __future__ import annotations

import statistics
import time

import torch

from rlhflab.rewards import FunctionSource, Reward, score
from rlhflab.rewards.remote import RemoteSource
from rlhflab.serve.app import BackgroundServer, create_app, demo_models


def main(n: int = 64, repeats: int = 5) -> None:
    torch.set_num_threads(1)
    policy, tok, rm = demo_models(seed=0, hidden_size=64, num_layers=2)
    rows = [{"query": f"SUBREDDIT: r/cats\n\nTITLE: post {i}\n\nPOST: my cat naps all day, number {i}\n\nTL;DR:",
             "post": f"my cat naps all day, number {i}"} for i in range(n)]
    texts = [f" cat naps {'a lot ' * (i % 5)}" for i in range(n)]
    from rlhflab.judges.gold import reward as gold

    app = create_app(policy, rm, tokenizer=tok, max_score_responses=64)
    with BackgroundServer(app) as srv:
        sources = {
            "rm (in process)": rm,
            "remote rlhflab /v1/score (loopback)": Reward([(1.0, RemoteSource(srv.url + "/v1/score"))]),
            "function (word count)": Reward([(1.0, FunctionSource(lambda p, c, **k: [len(x.split()) for x in c], "fn"))]),
            "gold judge": Reward([(1.0, FunctionSource(gold, "gold"))]),
        }
        local = score(rm, rows, texts)
        remote = score(sources["remote rlhflab /v1/score (loopback)"], rows, texts)
        print(f"max |local - remote| = {float((local - remote).abs().max()):.2e}")
        for name, reward in sources.items():
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                score(reward, rows, texts)
                times.append((time.perf_counter() - t0) * 1e3)
            print(f"{name:40s} {statistics.median(times):8.1f} ms per {n} scores (median of {repeats})")


if __name__ == "__main__":
    main()
