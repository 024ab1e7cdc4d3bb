"""Reward functions importable as ``reward_fns:NAME`` (tests put this folder on sys.path)."""

CALLS: list = []


def n_words(prompts, completions, **columns):
    CALLS.append({"prompts": list(prompts), "completions": list(completions), "columns": sorted(columns),
                  "post": list(columns.get("post") or [])})
    return [float(len(c.split())) for c in completions]


def mentions_post(prompts, completions, post=None, **columns):
    return [float(sum(w in p.split() for w in c.split())) for p, c in zip(post, completions)]


def wrong_length(prompts, completions, **columns):
    return [1.0] * (len(completions) - 1)


def nan_score(prompts, completions, **columns):
    return [float("nan")] * len(completions)


def not_numbers(prompts, completions, **columns):
    return ["good"] * len(completions)
