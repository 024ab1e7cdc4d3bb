"""``tldr-synth``: a known-answer TL;DR task generated from a world of facts.

Posts are written from facts of :mod:`rlhflab.data.synth_world` (who, event, ask; secondary
facts; distractors), in the columns of the real TL;DR datasets, so every stage reads them
through the same loader as real data. Because the facts are known, the gold judge
(:mod:`rlhflab.judges.gold`) scores any summary, and the run can report Bayes-optimal RM
accuracy and gold reward alongside the proxy (RM) reward.

Writers of summaries (``policy`` names in the preference data):

* ``oracle``  -- covers who, event and ask concisely (never written to the SFT files);
* ``ref``     -- the noisy human-ish reference (the SFT ``summary`` column): omits key facts
  at times, adds secondary facts or a distractor, sometimes copies the title, varies style;
* ``title``   -- a copy of the title (good when the title is descriptive, useless otherwise);
* ``verbose`` -- everything, secondary facts and distractors included, over the length budget;
* ``short``   -- the event (and maybe who), no ask;
* ``halluc``  -- an oracle summary with one invented fact (wrong person, ask, detail or number);
* ``vague``   -- says nothing ("idk what to do, any advice?").

Simulated labelers choose ``a`` over ``b`` with probability
``sigmoid((G(a) - G(b)) / tau + beta_len * (len_words(a) - len_words(b)))`` (DESIGN.md
"Two worlds"), sampled with the seed.

Output of :func:`synthesize` (byte-identical for the same :class:`SynthConfig`):
``sft/{train,validation,test}.jsonl`` (``id, subreddit, title, post, summary`` -- as
``vwxyzjn/summarize_from_feedback_tldr_3_filtered``, summary without a leading space),
``preference/{train,validation}.jsonl`` (``info {id, post, title, subreddit}``,
``summaries [{text, policy}] x 2``, ``choice``, ``chosen``, ``rejected`` -- as
``openai/summarize_from_feedback`` "comparisons", whose texts start with a space),
``tokenizer/`` (byte-level BPE trained on the train splits only, ``<|pad|>`` id 0, ``<|endoftext|>``
id 1) and ``stats.json``.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from rlhflab.config import SynthConfig
from rlhflab.data import synth_world as W
from rlhflab.data.tldr import format_query
from rlhflab.judges import gold

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
SFT_SPLITS = ("train", "validation", "test")
PREF_SPLITS = ("train", "validation")
NEAR_TIE_EPS = 0.01  # |G(a)-G(b)| below this counts as "equal gold" for the length-bias statistic

# Mixture of writers for preference comparisons: mostly close calls between noisy human-ish
# summaries (like the real comparisons, which pit similar policies), plus a tail of clearly
# better/worse ones so the RM sees the whole quality range.
PAIR_POLICIES = {"ref": 0.48, "oracle": 0.12, "title": 0.1, "verbose": 0.1, "short": 0.1, "halluc": 0.08, "vague": 0.02}


@dataclass(frozen=True)
class SynthPost:
    """One generated post and the facts it was written from.

    Attributes:
        id, subreddit, title, post: the dataset columns.
        rel: relation name (``synth_world.REL_BY_NAME``); noun: its noun as written.
        pron: ``{"he", "He", "him", "his", "His"}`` of the other person.
        nage, rage: ages with gender letter of narrator and other ("25F", "27M").
        event, ask: fact ids; secondary, distractors: tuples of fact ids in the post.
        slots: details used by templates (amount, months, ...).
        title_kind: ``descriptive | partial | useless``.
    """

    id: str
    subreddit: str
    title: str
    post: str
    rel: str
    noun: str
    pron: dict
    nage: str
    rage: str
    event: str
    ask: str
    secondary: tuple[str, ...]
    distractors: tuple[str, ...]
    slots: dict
    title_kind: str

    def sft_row(self, summary: str) -> dict:
        return {"id": self.id, "subreddit": self.subreddit, "title": self.title, "post": self.post, "summary": summary}


# ------------------------------------------------------------------------ post generation
def _cap(s: str) -> str:
    return s[:1].upper() + s[1:] if s else s


def _pronouns(gender: str) -> dict:
    he, him, his = ("he", "him", "his") if gender == "M" else ("she", "her", "her")
    return {"he": he, "He": he.capitalize(), "him": him, "his": his, "His": his.capitalize()}


def _options_by_sub() -> dict[str, list[tuple[W.Fact, str]]]:
    """subreddit -> every (event, relation) pair that fits it."""
    out: dict[str, list[tuple[W.Fact, str]]] = {}
    by_name = {e.name: e for e in W.EVENTS}
    for sub, (events, rels) in W.SUBREDDITS.items():
        opts = [(by_name[e], r) for e in events for r in by_name[e].rels if rels is None or r in rels]
        out[sub] = [(e, r) for e, r in opts if _asks_for(e, r)]
    return out


def _asks_for(event: W.Fact, rel: str) -> list[W.Fact]:
    asks = [W.FACT_BY_ID[f"ask:{a}"] for a in event.asks]
    return [a for a in asks if a.rels is None or rel in a.rels]


_OPTIONS = _options_by_sub()
_SUBS = tuple(sorted(W.SUBREDDITS))


def _ages(rel: W.Relation, rng: random.Random) -> tuple[int, int]:
    n_lo, n_hi, o_lo, o_hi, relative = rel.ages
    nage = rng.randint(n_lo, n_hi)
    rage = nage + rng.randint(o_lo, o_hi) if relative else rng.randint(o_lo, o_hi)
    return nage, max(rage, 14 if rel.group in ("family", "child") else 18)


def _fill(template: str, ctx: dict) -> str:
    return template.format(**ctx)


def _n_words(text: str) -> int:
    return len(text.split())


def sample_post(rng: random.Random, post_id: str) -> SynthPost:
    """Draw one post from the world (facts, then text) with ``rng``."""
    sub = rng.choice(_SUBS)
    event, rel_name = rng.choice(_OPTIONS[sub])
    rel = W.REL_BY_NAME[rel_name]
    ask = rng.choice(_asks_for(event, rel_name))
    gender = rng.choice(sorted(rel.nouns))
    noun = rel.nouns[gender]
    pron = _pronouns(gender)
    nage_i, rage_i = _ages(rel, rng)
    nage, rage = f"{nage_i}{rng.choice('MF')}", f"{rage_i}{gender}"
    slots = {"amt": rng.choice(W.AMOUNTS), "n": rng.randint(2, 11), "month": rng.choice(W.MONTHS), "day": rng.choice(W.DAYS),
             "state": rng.choice(W.STATES), "pet": rng.choice(W.PETS)}
    ctx = {**pron, **slots, "R": f"my {noun}", "Rc": f"My {noun}", "rel": noun, "nage": nage, "rage": rage}

    pool = [s for s in W.SECONDARY if s.rels is None or rel_name in s.rels]
    secondary = rng.sample(pool, rng.choices((0, 1, 2, 3), (0.25, 0.4, 0.25, 0.1))[0])
    distractors = rng.sample(W.DISTRACTORS, rng.choices((0, 1, 2), (0.45, 0.4, 0.15))[0])

    def sec_sentence(s: W.Fact) -> str:
        post = s.post
        if s.name == "duration":  # partners are "together", everyone else has "known each other"
            post = tuple(t for t in post if ("together" in t) == (rel.group == "partner"))
        return _fill(rng.choice(post), ctx)

    intro = _fill(rng.choice(W.INTROS), ctx)
    event_s = _fill(rng.choice(event.post), ctx)
    fillers = [_fill(t, ctx) for t in event.details] + list(W.FEELINGS)  # fact-free sentences
    rng.shuffle(fillers)
    extra, spare = fillers[:rng.randint(1, 2)], fillers[3:]
    sec_s = [sec_sentence(s) for s in secondary]
    sec_first = rng.random() < 0.5
    ask_s = _fill(rng.choice(ask.post), ctx)
    closer = [rng.choice(W.CLOSERS)] if rng.random() < 0.6 else []
    start: list[str] = []
    end: list[str] = []
    for d in distractors:  # Reddit noise opens ("throwaway ...") or closes ("Edit: ...") a post
        (start if d.name in ("throwaway", "lurker", "english") and rng.random() < 0.7 else end).append(_fill(rng.choice(d.post), ctx))
    joiner = "\n\n" if rng.random() < 0.7 else " "  # most posts have paragraphs (Huang truncates at newlines)

    def text() -> str:
        first = start + [intro] + (sec_s if sec_first else []) + [event_s] + extra
        second = ([] if sec_first else sec_s) + [ask_s] + closer
        return joiner.join(p for p in (" ".join(first), " ".join(second), " ".join(end)) if p)

    # Posts are 40-110 words: pad with fact-free sentences, or trim those first.
    while _n_words(text()) < 40 and spare:
        extra.append(spare.pop())
    while _n_words(text()) > 110 and (extra or closer):
        (extra or closer).pop()
    while _n_words(text()) > 110 and sec_s:
        sec_s.pop()
        secondary.pop()
    body = text()

    title, title_kind = _title(event, ask, noun, nage, rage, ctx, rng)
    return SynthPost(id=post_id, subreddit=sub, title=title, post=body, rel=rel_name, noun=noun, pron=pron, nage=nage,
                     rage=rage, event=event.id, ask=ask.id, secondary=tuple(s.id for s in secondary),
                     distractors=tuple(d.id for d in distractors), slots=slots, title_kind=title_kind)


def _title(event: W.Fact, ask: W.Fact, noun: str, nage: str, rage: str, ctx: dict,
           rng: random.Random) -> tuple[str, str]:
    """A descriptive (who+event[+ask]), partial (one key fact) or useless title."""
    u = rng.random()
    if u < 0.35:
        subj = rng.choice((f"My ({nage}) {noun} ({rage})", f"[{nage}] My {noun} [{rage}]", f"My {noun} ({rage})"))
        title = _fill(rng.choice(event.summary), {**ctx, "S": subj})
        if rng.random() < 0.7:
            title += rng.choice((", ", ". ")) + _cap(_fill(rng.choice(ask.summary), ctx))
        return title, "descriptive"
    if u < 0.7:
        k = rng.randrange(3)
        if k == 0:
            return _cap(_fill(rng.choice(event.summary), {**ctx, "S": noun})), "partial"
        if k == 1:
            return _cap(_fill(rng.choice(W.WHO_ONLY), {**ctx, "R": f"my {noun} ({rage})"})), "partial"
        return _cap(_fill(rng.choice(ask.summary), ctx)), "partial"
    return rng.choice(W.USELESS_TITLES), "useless"


# ------------------------------------------------------------------------------ writers
def _ctx(p: SynthPost) -> dict:
    return {**p.pron, **p.slots, "R": f"my {p.noun}", "Rc": f"My {p.noun}"}


def _subject(p: SynthPost, rng: random.Random, who: bool) -> str:
    if not who:
        return p.pron["he"]
    rel = W.REL_BY_NAME[p.rel]
    forms = [f"my {p.noun}", f"my {p.noun}", f"my ({p.rage}) {p.noun}", f"my {p.noun} ({p.rage})"]
    forms += [f"my {s}" for s in rel.short]
    return rng.choice(forms)


def _event_clause(p: SynthPost, rng: random.Random, subj: str) -> str:
    return _fill(rng.choice(W.FACT_BY_ID[p.event].summary), {**_ctx(p), "S": subj})


def _ask_clause(p: SynthPost, rng: random.Random, ask_id: Optional[str] = None) -> str:
    return _fill(rng.choice(W.FACT_BY_ID[ask_id or p.ask].summary), _ctx(p))


def _sec_clause(p: SynthPost, rng: random.Random, sec_id: str) -> str:
    forms = W.FACT_BY_ID[sec_id].summary
    if sec_id == "secondary:duration":
        forms = tuple(t for t in forms if ("known" in t) != (W.REL_BY_NAME[p.rel].group == "partner"))
    return _fill(rng.choice(forms), _ctx(p))


def _join(sentences: Iterable[str]) -> str:
    out = []
    for s in sentences:
        s = _cap(s.strip())
        out.append(s if s[-1:] in ".?!" else s + ".")
    return " ".join(out)


def oracle_summary(p: SynthPost, rng: random.Random) -> str:
    """Who, event and ask in one or two short sentences (at most 20 words)."""
    ev = _event_clause(p, rng, _subject(p, rng, who=True))
    ask = _ask_clause(p, rng)
    frame = rng.randrange(3)
    if frame == 2:
        text = _join([f"{ev} and {rng.choice(W.FEELING_CLAUSES)}", ask])
    elif frame == 1 and ask.endswith("?"):
        text = _cap(ev) + ", " + ask
    else:
        text = _join([ev, ask])
    if _n_words(text) > 20:  # concise above all: the plainest subject, no feelings
        text = _join([_event_clause(p, rng, f"my {p.noun}"), ask])
    return text


# How often the noisy reference writer does each thing (tuned with the labeler settings so
# that reference < oracle by a clear margin while comparisons stay close calls).
REFERENCE_PROBS = {"title": 0.12, "who": 0.65, "event": 0.88, "ask": 0.35, "secondary": 0.12, "feeling": 0.3,
                   "invented": 0.02, "distractor": 0.2, "filler": 0.25, "lower": 0.15}
REFERENCE_MAX_WORDS = 30


def reference_summary(p: SynthPost, rng: random.Random) -> str:
    """The noisy human-ish reference: the SFT target (mediocre on average, varied in length)."""
    q = REFERENCE_PROBS
    if rng.random() < q["title"]:
        return p.title
    who, ev, ask = rng.random() < q["who"], rng.random() < q["event"], rng.random() < q["ask"]
    parts: list[str] = []
    subj = _subject(p, rng, who)
    if ev:
        clause = _event_clause(p, rng, subj)
        if rng.random() < q["feeling"]:
            clause += " and " + rng.choice(W.FEELING_CLAUSES)
        parts.append(clause)
    elif who:
        parts.append(_fill(rng.choice(W.WHO_ONLY), {**_ctx(p), "R": subj}))
    secs = [s for s in p.secondary if rng.random() < q["secondary"]][:2]
    sec_clauses = [_sec_clause(p, rng, s) for s in secs]
    parts += sec_clauses
    if rng.random() < q["invented"]:  # a human slip: a detail that is not in the post
        parts.append(_invented_clause(p, rng))
    if ask:
        parts.append(_ask_clause(p, rng))
    if p.distractors and rng.random() < q["distractor"]:
        parts.append(rng.choice(W.FACT_BY_ID[rng.choice(p.distractors)].summary))
    if not parts:
        return rng.choice(W.VAGUE_SUMMARIES)
    if rng.random() < q["filler"]:  # gold-neutral words: lengths vary at equal quality
        parts.insert(1, rng.choice(W.FEELINGS))
    # SFT drops references over the response budget (53 tokens, Huang): stay well inside it
    # by dropping the minor parts (filler, secondary facts) first.
    minor = [x for x in parts if x in W.FEELINGS] + [x for x in parts if x in sec_clauses]
    while _n_words(_join(parts)) > REFERENCE_MAX_WORDS and minor:
        parts.remove(minor.pop(0))
    text = _join(parts)
    if rng.random() < q["lower"]:
        text = text.lower()
    return text


def _invented_clause(p: SynthPost, rng: random.Random) -> str:
    """A secondary fact the post does not contain."""
    pool = [s for s in W.SECONDARY if s.id not in p.secondary and s.name != "duration"]
    return _fill(rng.choice(rng.choice(pool).summary), _ctx(p))


def halluc_summary(p: SynthPost, rng: random.Random) -> str:
    """An oracle-like summary with exactly one invented fact."""
    k = rng.randrange(4)
    if k == 0:  # the wrong person
        other = rng.choice([r for r in W.RELATIONS if r.name != p.rel and r.group == W.REL_BY_NAME[p.rel].group]
                           or [r for r in W.RELATIONS if r.name != p.rel])
        subj = "my " + next(iter(other.nouns.values()))
        return _join([_event_clause(p, rng, subj), _ask_clause(p, rng)])
    ev = _event_clause(p, rng, _subject(p, rng, who=True))
    if k == 1:  # the wrong ask
        others = [a for a in W.ASKS if a.id != p.ask and (a.rels is None or p.rel in a.rels)]
        return _join([ev, _ask_clause(p, rng, rng.choice(others).id)])
    if k == 2:  # a secondary fact not in the post
        return _join([ev, _invented_clause(p, rng), _ask_clause(p, rng)])
    in_post = set(re.findall(r"\d+", p.post))
    years = next(y for y in range(p.slots["n"] + 13, 200) if str(y) not in in_post)
    return _join([ev + f" after {years} years", _ask_clause(p, rng)])  # a number not in the post


def verbose_summary(p: SynthPost, rng: random.Random) -> str:
    """Everything: key facts, all secondary facts, feelings, and the post's distractors."""
    parts = [_event_clause(p, rng, _subject(p, rng, True)) + " and " + rng.choice(W.FEELING_CLAUSES)]
    parts += [_sec_clause(p, rng, s) for s in p.secondary]
    parts.append(rng.choice(W.FEELINGS))
    parts.append(_ask_clause(p, rng))
    ds = list(p.distractors) or [rng.choice(W.DISTRACTORS).id]
    parts += [rng.choice(W.FACT_BY_ID[d].summary) for d in ds]
    parts.append(rng.choice(W.CLOSERS))
    return _join(parts)


def short_summary(p: SynthPost, rng: random.Random) -> str:
    """The event (with who half the time), no ask."""
    return _join([_event_clause(p, rng, _subject(p, rng, rng.random() < 0.5))])


WRITERS: dict[str, Callable[[SynthPost, random.Random], str]] = {
    "oracle": oracle_summary,
    "ref": reference_summary,
    "title": lambda p, rng: p.title,
    "verbose": verbose_summary,
    "short": short_summary,
    "halluc": halluc_summary,
    "vague": lambda p, rng: rng.choice(W.VAGUE_SUMMARIES),
}


# ----------------------------------------------------------------------------- labelers
def labeler_prob(gold_a: float, gold_b: float, len_a: int, len_b: int, tau: float, beta_len: float) -> float:
    """P(a preferred over b) = sigmoid((G(a) - G(b)) / tau + beta_len * (len_a - len_b)); lengths in words."""
    z = (gold_a - gold_b) / tau + beta_len * (len_a - len_b)
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def gold_scores(posts: Sequence[str], summaries: Sequence[str]) -> list[float]:
    """Gold totals of aligned ``posts``/``summaries`` (thin wrapper of :func:`rlhflab.judges.gold.score_many`)."""
    return [g.total for g in gold.score_many(posts, summaries)]


# --------------------------------------------------------------------------- synthesis
class _Ids:
    """Unique Reddit-like ids (``t3_`` + 6 base-36 chars) and unique post texts across splits."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.posts: set[str] = set()

    def new_id(self, rng: random.Random) -> str:
        while True:
            n = rng.randrange(36**5, 36**6)
            s = ""
            while n:
                n, r = divmod(n, 36)
                s = "0123456789abcdefghijklmnopqrstuvwxyz"[r] + s
            if s not in self.ids:
                self.ids.add(s)
                return "t3_" + s

    def new_post(self, rng: random.Random) -> SynthPost:
        while True:
            p = sample_post(rng, self.new_id(rng))
            if p.post not in self.posts:
                self.posts.add(p.post)
                return p


def _check_post(p: SynthPost) -> None:
    """The judge must recover exactly the facts the post was written from."""
    want = {f"who:{p.rel}", p.event, p.ask, *p.secondary, *p.distractors}
    got = set(gold.post_facts(p.post))  # cached: the judge reads this post again right after
    if got != want:
        raise RuntimeError(f"tldr-synth world inconsistency in post {p.id}: wrote {sorted(want)}, judge reads {sorted(got)}:\n{p.post}")


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _percentiles(xs: Sequence[int]) -> dict:
    s = sorted(xs)
    if not s:
        return {"p50": None, "p95": None, "max": None}
    q = lambda f: s[min(len(s) - 1, int(round(f * (len(s) - 1))))]  # noqa: E731 - nearest-rank percentile
    return {"p50": q(0.5), "p95": q(0.95), "max": s[-1]}


def _round(x: float, nd: int = 4) -> float:
    return round(x, nd)


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def _lexicon_texts() -> list[str]:
    """Every template of the world, filled in for each relation noun and both genders."""
    texts = []
    for rel in W.RELATIONS:
        for gender, noun in sorted(rel.nouns.items()):
            ctx = {**_pronouns(gender), "amt": "$800", "n": 3, "month": "May", "day": "Friday", "state": "Ohio", "pet": "Max",
                   "R": f"my {noun}", "Rc": f"My {noun}", "S": f"my {noun}", "rel": noun, "nage": "25F", "rage": f"27{gender}"}
            texts += [" " + _fill(t, ctx) for t in W.INTROS + W.WHO_ONLY]
            texts += [" " + _fill(t, ctx) for f in W.FACTS if f.rels is None or rel.name in f.rels for t in f.post + f.summary + f.details]
    texts += [" " + t for t in W.FEELINGS + W.CLOSERS + W.FEELING_CLAUSES + W.USELESS_TITLES + W.VAGUE_SUMMARIES]
    texts += [" ".join(W.MONTHS + W.DAYS + W.STATES + W.PETS + W.AMOUNTS)]
    texts += [format_query(sub, "", "") for sub in sorted(W.SUBREDDITS)]
    return texts


def _train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    """Byte-level BPE on the corpus, saved as a transformers fast tokenizer (pad id 0, eos id 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD_TOKEN, EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN).save_pretrained(str(out))
    return tok


def synthesize(out_dir: str | Path, cfg: SynthConfig, progress: bool = True) -> dict:
    """Write the tldr-synth dataset for ``cfg`` under ``out_dir``; return the stats (also in ``stats.json``).

    Same ``cfg`` -> byte-identical files. Posts are distinct across all splits. The returned
    dict is ``stats.json`` plus ``seconds`` (wall time, kept out of the file).
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = _Ids()
    n_sft = {"train": cfg.n_sft_train, "validation": cfg.n_sft_validation, "test": cfg.n_sft_test}
    n_pref = {"train": cfg.n_pref_train, "validation": cfg.n_pref_validation}
    bar = tqdm(total=sum(n_sft.values()) + sum(n_pref.values()), desc="tldr-synth", unit="row", disable=not progress)

    sft: dict[str, list[tuple[SynthPost, str]]] = {}
    for split in SFT_SPLITS:
        rng = random.Random(f"tldr-synth:{cfg.seed}:sft:{split}")
        rows = []
        for _ in range(n_sft[split]):
            p = ids.new_post(rng)
            _check_post(p)
            rows.append((p, reference_summary(p, rng)))
            bar.update()
        sft[split] = rows
        _write_jsonl(out / "sft" / f"{split}.jsonl", (p.sft_row(s) for p, s in rows))

    # pair_writers reweights the *train* comparisons only (targeted collection, e.g. more pairs with
    # an invented fact); the validation comparisons keep the built-in mix, so the RM's accuracy
    # measures the same thing whatever mix it was trained on and stays comparable across recipes.
    mixes = {"train": {**PAIR_POLICIES, **cfg.pair_writers}, "validation": dict(PAIR_POLICIES)}
    pref: dict[str, list[dict]] = {}
    pair_meta: dict[str, list[tuple[float, float, int, int, float, int]]] = {}
    policy_gold: dict[str, list[float]] = {n: [] for n in PAIR_POLICIES}
    for split in PREF_SPLITS:
        names, weights = list(mixes[split]), list(mixes[split].values())
        rng = random.Random(f"tldr-synth:{cfg.seed}:preference:{split}")
        rows, meta = [], []
        p: Optional[SynthPost] = None
        left = 0
        while len(rows) < n_pref[split]:
            if left == 0:  # 1-3 comparisons per post, as in the real comparisons data
                p = ids.new_post(rng)
                _check_post(p)
                left = rng.choice((1, 1, 2, 3))
            left -= 1
            while True:
                pa, pb = rng.choices(names, weights, k=2)
                a, b = WRITERS[pa](p, rng), WRITERS[pb](p, rng)
                if a.strip() != b.strip():
                    break
            ga, gb = gold_scores([p.post, p.post], [a, b])
            la, lb = _n_words(a), _n_words(b)
            prob = labeler_prob(ga, gb, la, lb, cfg.labeler_tau, cfg.labeler_len_beta)
            choice = 0 if rng.random() < prob else 1
            policy_gold[pa].append(ga)
            policy_gold[pb].append(gb)
            texts = [" " + a, " " + b]  # comparison texts carry a leading space (SFD's tldr_dataset.py comment)
            rows.append({"info": {"id": p.id, "post": p.post, "title": p.title, "subreddit": p.subreddit},
                         "summaries": [{"text": texts[0], "policy": pa}, {"text": texts[1], "policy": pb}],
                         "choice": choice, "chosen": texts[choice], "rejected": texts[1 - choice]})
            meta.append((ga, gb, la, lb, prob, choice))
            bar.update()
        pref[split], pair_meta[split] = rows, meta
        _write_jsonl(out / "preference" / f"{split}.jsonl", rows)
    bar.close()

    # Tokenizer: trained on the text the models will read (queries and " summary") of the *train*
    # splits only, so held-out text never shapes it and the validation/test sizes (e.g. a larger
    # n_pref_validation for a sharper RM accuracy) leave the tokenizer -- and every model -- unchanged.
    corpus = [format_query(p.subreddit, p.title, p.post) + " " + s for p, s in sft["train"]]
    corpus += [r["info"]["title"] + s["text"] for r in pref["train"] for s in r["summaries"]]
    corpus += _lexicon_texts()  # the whole world's wording, so small corpora still get its merges
    tok = _train_tokenizer(corpus, cfg.vocab_size, out / "tokenizer")

    stats = _stats(cfg, sft, pref, pair_meta, policy_gold, tok)
    (out / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return {**stats, "seconds": round(time.perf_counter() - t0, 2)}


def _stats(cfg: SynthConfig, sft: dict, pref: dict, pair_meta: dict, policy_gold: dict, tok) -> dict:
    val = sft["validation"]
    rng = random.Random(f"tldr-synth:{cfg.seed}:stats")
    posts = [p.post for p, _ in val]
    oracle = [oracle_summary(p, rng) for p, _ in val]
    g = {"reference": gold_scores(posts, [s for _, s in val]), "oracle": gold_scores(posts, oracle),
         "title": gold_scores(posts, [p.title for p, _ in val])}

    agreement, bayes, length = {}, None, {}
    for split, meta in pair_meta.items():
        decided = [(ga > gb) == (c == 0) for ga, gb, _, _, _, c in meta if ga != gb]
        agreement[split] = {"agreement": sum(decided) / len(decided) if decided else None,
                            "pairs": len(meta), "ties_excluded": len(meta) - len(decided)}
        near = [(la, lb, pr, c) for ga, gb, la, lb, pr, c in meta if abs(ga - gb) < NEAR_TIE_EPS and la != lb]
        length[split] = {"pairs": len(near),
                         # sampled labels, and the labelers' expected rate (same pairs, no sampling noise)
                         "longer_chosen_rate": _round(sum((la > lb) == (c == 0) for la, lb, _, c in near) / len(near)) if near else None,
                         "longer_chosen_prob": _round(sum(pr if la > lb else 1 - pr for la, lb, pr, _ in near) / len(near)) if near else None,
                         "mean_abs_len_diff_words": _round(sum(abs(la - lb) for la, lb, _, _ in near) / len(near), 2) if near else None}
    vmeta = pair_meta["validation"]
    bayes = sum(max(pr, 1 - pr) for *_, pr, _ in vmeta) / len(vmeta)

    def enc_len(texts: list[str], eos: int = 0) -> list[int]:
        return [len(e.ids) + eos for e in tok.encode_batch(texts)]

    all_sft = [x for rows in sft.values() for x in rows]
    queries = [format_query(p.subreddit, p.title, p.post) for p, _ in all_sft]
    pref_texts = [s["text"] for rows in pref.values() for r in rows for s in r["summaries"]]
    return {
        "seed": cfg.seed,
        "rows": {"sft": {k: len(v) for k, v in sft.items()}, "preference": {k: len(v) for k, v in pref.items()}},
        "gold_mean": {k: round(_mean_std(v)[0], 4) for k, v in g.items()},
        "gold_std": {k: round(_mean_std(v)[1], 4) for k, v in g.items()},
        "gold_on": "sft validation posts",
        "policy_gold_mean": {k: round(_mean_std(v)[0], 4) for k, v in policy_gold.items() if v},
        "labeler": {"tau": cfg.labeler_tau, "beta_len": cfg.labeler_len_beta, **{
            split: {**a, "agreement": None if a["agreement"] is None else round(a["agreement"], 4)} for split, a in agreement.items()}},
        "bayes_accuracy": round(bayes, 4),
        "length_bias": {"beta_len": cfg.labeler_len_beta, "near_tie_eps": NEAR_TIE_EPS, **length},
        "words": {"reference_mean": round(_mean_std([_n_words(s) for _, s in val])[0], 2),
                  "oracle_mean": round(_mean_std([_n_words(s) for s in oracle])[0], 2),
                  "post_mean": round(_mean_std([_n_words(p.post) for p, _ in all_sft])[0], 2)},
        "tokens": {"query": _percentiles(enc_len(queries)),
                   "reference": _percentiles(enc_len([" " + s for _, s in all_sft], eos=1)),
                   "oracle": _percentiles(enc_len([" " + s for s in oracle], eos=1)),
                   "preference_summary": _percentiles(enc_len(pref_texts, eos=1)),
                   "note": "response lengths count a leading space and EOS"},
        "config": cfg.model_dump(mode="json"),
    }
