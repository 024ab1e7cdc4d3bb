"""The gold judge of ``tldr-synth``: a deterministic score for ANY summary of a post.

The judge knows the world's vocabulary (:mod:`rlhflab.data.synth_world`), not a hidden id:
it recovers the post's facts by matching every fact's patterns against the post text, and
finds the facts a summary mentions the same way, so paraphrases count. It never fails on
free text: empty strings, garbage, repetition and very long outputs all get a finite score.

Formula (every term is a field of :class:`GoldScore`)::

    coverage  = sum of KEY_WEIGHTS[kind] over the post's key facts the summary mentions
                / the same sum over all the post's key facts       (who 0.3, event 0.4, ask 0.3)
    total     = 0.5 + 0.4 * coverage
              - 0.2    if the summary mentions none of the post's key facts
              + 0.04 * min(secondary_covered, 2)          # minor facts: small credit
              - 0.15 * hallucinated                       # world facts or numbers not in the post
              - 0.12 * distractors                        # "on mobile", "throwaway", ... in the summary
              - 0.01 * over_length   (at most 0.5)        # words beyond LENGTH_BUDGET = 24
              - 1.0  * repetition                         # repeated 4-grams / immediate word repeats
              - 1.0  * junk                               # fraction of words outside the world + post
    total     = clip(total, -1, 1);   a summary without a single word scores exactly -1.

So an oracle summary (all key facts, concise) scores 0.9 (up to 0.98 with secondary
facts), one missing the ask 0.78, one with only the event and the wrong person 0.51, a
copy of a useless title ("need advice!!") 0.3, and degenerate text (repetition, junk)
goes negative. A post without any world fact (not a tldr-synth post) gives every
non-empty, non-degenerate summary 0.5.

The slope is small on purpose: with the labelers' tau = 0.15 (config.SynthConfig) a
one-fact difference (0.12-0.16) is a close call of about 70:30, as human comparisons of
similar summaries are, and the labelers agree with the gold ordering on ~73% of the
default comparisons (``stats.json`` reports it).

Hallucinations: a who/event/ask/secondary fact of the world mentioned in the summary but not
in the post, and each number (age, amount, duration) in the summary that the post lacks.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Sequence

from rlhflab.data.synth_world import FACT_BY_ID, KEY_KINDS, VOCAB, detect, normalize

# The scale is tuned with the simulated labelers (tau=0.15, beta_len=0.03 per word): one key
# fact is worth 0.12-0.16, so comparisons that differ by one fact are right ~70-74% of the
# time and the labelers agree with the gold ordering ~73% overall (stats.json reports it).
KEY_WEIGHTS = {"who": 0.3, "event": 0.4, "ask": 0.3}
BASE = 0.5
KEY_SCALE = 0.4
NO_CONTENT_PENALTY = 0.2
SECONDARY_CREDIT = 0.04
SECONDARY_MAX = 2
HALLUCINATION_PENALTY = 0.15
DISTRACTOR_PENALTY = 0.12
LENGTH_BUDGET = 24
OVER_LENGTH_PENALTY = 0.01
OVER_LENGTH_CAP = 0.5
REPETITION_PENALTY = 1.0
JUNK_PENALTY = 1.0
MAX_WORD_CHARS = 25
EOS_TEXT, PAD_TEXT = "<|endoftext|>", "<|pad|>"  # the tldr-synth tokenizer's special tokens

_STRIP = ".,!?;:()[]{}\"'`*…-–—"
_NUMBER_TOKEN = re.compile(r"^\$?\d+(?:[.,]\d+)?(?:am|pm|m|f|k|s|th|st|nd|rd)?$")
_NUMBERS = re.compile(r"\d+")
# Huang's query format; a caller may pass a whole query: only its POST part is the post
# (the subreddit name, e.g. r/college, must not count as a fact of the post).
_QUERY = re.compile(r"^SUBREDDIT: r/[^\n]*\n\nTITLE: .*?\n\nPOST: (.*?)(?:\n\nTL;DR:)?\s*$", re.DOTALL)


@dataclass(frozen=True)
class GoldScore:
    """The gold judge's verdict on one summary.

    Attributes:
        total: the score, in [-1, 1] (formula in the module docstring).
        key_covered: key facts (who/event/ask) of the post the summary mentions.
        key_total: key facts of the post.
        coverage: weighted key coverage in [0, 1] (0 when the post has no key fact).
        secondary_covered: secondary facts of the post the summary mentions.
        hallucinated: facts/numbers in the summary the post does not contain.
        distractors: distractor facts in the summary.
        words: word tokens of the summary.
        over_length: words beyond ``LENGTH_BUDGET``.
        repetition: degenerate repetition fraction in [0, 1].
        junk: fraction of words that are neither world vocabulary, post words nor numbers.
        empty: the summary has no word at all.
        missing: ids of the post's key facts the summary misses (not in ``as_dict``).
        hallucinated_facts: ids/numbers counted as hallucinated (not in ``as_dict``).
    """

    total: float
    key_covered: int
    key_total: int
    coverage: float
    secondary_covered: int
    hallucinated: int
    distractors: int
    words: int
    over_length: int
    repetition: float
    junk: float
    empty: bool
    missing: tuple[str, ...] = ()
    hallucinated_facts: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, float]:
        """The numeric fields (bools as 0/1) -- ready to average and log as metrics."""
        d = asdict(self)
        d.pop("missing")
        d.pop("hallucinated_facts")
        d["empty"] = int(self.empty)
        return d


def _tokens(text: str) -> list[tuple[str, bool]]:
    """(word, ends_sentence) per word: lower-cased, edge punctuation stripped, pure punctuation dropped."""
    out = []
    for tok in normalize(text).split():
        w = tok.strip(_STRIP)
        if w:
            out.append((w, tok.rstrip("\"')]").endswith((".", "!", "?"))))
    return out


def _words(text: str) -> list[str]:
    return [w for w, _ in _tokens(text)]


@lru_cache(maxsize=8192)
def _post_info(post: str) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(fact ids, numbers, words) of a post; cached since every post is judged many times."""
    m = _QUERY.match(post)
    if m:
        post = m.group(1)
    return detect(post), frozenset(_NUMBERS.findall(post)), frozenset(_words(post))


def post_facts(post: str) -> frozenset[str]:
    """Ids of the world facts the judge reads in ``post`` (cached)."""
    return _post_info(post)[0]


_SUFFIXES = ("'s", "ing", "ed", "es", "er", "ly", "s", "d")


def _is_known(word: str, post_words: frozenset[str]) -> bool:
    """A word of the world's vocabulary or of the post, a number, or an inflection of one."""
    if len(word) > MAX_WORD_CHARS:
        return False
    if word in VOCAB or word in post_words or _NUMBER_TOKEN.match(word):
        return True
    for suf in _SUFFIXES:  # "dumped", "cheats", "boyfriend's": real words a model may inflect
        if word.endswith(suf) and len(word) > len(suf) + 2:
            stem = word[: -len(suf)]
            if stem in VOCAB or stem in post_words or stem + "e" in VOCAB:
                return True
    return False


def _repetition(tokens: list[tuple[str, bool]]) -> float:
    """Fraction of word positions that repeat: the same word twice in a row within a sentence
    ("bf bf"), or a 4-gram seen before (loops). Natural reuse ("I go to ... I go to") is free."""
    words = [w for w, _ in tokens]
    if len(words) < 2:
        return 0.0
    bad = sum(1 for (a, end), (b, _) in zip(tokens, tokens[1:]) if a == b and not end)
    seen: set[tuple[str, ...]] = set()
    for gram in zip(words, words[1:], words[2:], words[3:]):
        if gram in seen:
            bad += 1
        seen.add(gram)
    return min(1.0, bad / (len(words) - 1))


def score(post: str, summary: str) -> GoldScore:
    """Score ``summary`` as a TL;DR of ``post`` (both free text).

    ``post`` is the post text; a whole TL;DR query (``SUBREDDIT: ... POST: ... TL;DR:``) is
    accepted too and judged by its POST part. ``summary`` may still hold the tokenizer's
    special tokens: it is cut at the first ``<|endoftext|>`` and ``<|pad|>`` is ignored.

    Raises:
        TypeError: if ``post`` or ``summary`` is not a string.
    """
    if not isinstance(post, str):
        raise TypeError(f"gold.score: post must be a str, got {type(post).__name__}")
    if not isinstance(summary, str):
        raise TypeError(f"gold.score: summary must be a str, got {type(summary).__name__}")
    # Text decoded with special tokens kept: the response ends at the first EOS (Huang's
    # truncation after the stop token); padding is nothing.
    summary = summary.split(EOS_TEXT, 1)[0].replace(PAD_TEXT, " ")
    post_facts, post_numbers, post_words = _post_info(post)
    key_facts = sorted(f for f in post_facts if FACT_BY_ID[f].kind in KEY_KINDS)
    tokens = _tokens(summary)
    words = [w for w, _ in tokens]
    if not words:
        return GoldScore(total=-1.0, key_covered=0, key_total=len(key_facts), coverage=0.0, secondary_covered=0,
                         hallucinated=0, distractors=0, words=0, over_length=0, repetition=0.0, junk=0.0, empty=True,
                         missing=tuple(key_facts))

    said = detect(summary)
    covered = [f for f in key_facts if f in said]
    key_weight = sum(KEY_WEIGHTS[FACT_BY_ID[f].kind] for f in key_facts)
    coverage = sum(KEY_WEIGHTS[FACT_BY_ID[f].kind] for f in covered) / key_weight if key_weight else 0.0
    secondary = sum(1 for f in said if f in post_facts and FACT_BY_ID[f].kind == "secondary")
    distractors = sum(1 for f in said if FACT_BY_ID[f].kind == "distractor")
    invented = sorted(f for f in said if f not in post_facts and FACT_BY_ID[f].kind != "distractor")
    invented += sorted(set(_NUMBERS.findall(summary)) - post_numbers)
    over = max(0, len(words) - LENGTH_BUDGET)
    repetition = _repetition(tokens)
    junk = sum(1 for w in words if not _is_known(w, post_words)) / len(words)

    total = (BASE + KEY_SCALE * coverage
             - (NO_CONTENT_PENALTY if key_facts and not covered else 0.0)
             + SECONDARY_CREDIT * min(secondary, SECONDARY_MAX)
             - HALLUCINATION_PENALTY * len(invented)
             - DISTRACTOR_PENALTY * distractors
             - min(OVER_LENGTH_CAP, OVER_LENGTH_PENALTY * over)
             - REPETITION_PENALTY * repetition
             - JUNK_PENALTY * junk)
    return GoldScore(total=float(max(-1.0, min(1.0, total))), key_covered=len(covered), key_total=len(key_facts),
                     coverage=coverage, secondary_covered=secondary, hallucinated=len(invented), distractors=distractors,
                     words=len(words), over_length=over, repetition=repetition, junk=junk, empty=False,
                     missing=tuple(f for f in key_facts if f not in said), hallucinated_facts=tuple(invented))


def score_many(posts: Sequence[str], summaries: Sequence[str]) -> list[GoldScore]:
    """:func:`score` for aligned lists.

    Raises:
        ValueError: if the lists differ in length.
    """
    if len(posts) != len(summaries):
        raise ValueError(f"gold.score_many: {len(posts)} posts but {len(summaries)} summaries; they must align")
    return [score(p, s) for p, s in zip(posts, summaries)]


def reward(prompts: Sequence[str], completions: Sequence[str], post: Sequence[str] | None = None, **columns) -> list[float]:
    """The gold judge as a reward function (``reward.sources=[{kind: gold}]``, or
    ``{kind: function, path: "rlhflab.judges.gold:reward"}``): the total of each stripped
    completion on its row's raw ``post`` (the SFT rows' untruncated post, not the query)."""
    if post is None:
        raise ValueError("the gold reward needs the prompts' 'post' column (tldr-synth SFT rows)")
    return [s.total for s in score_many(list(post), [c.strip() for c in completions])]
