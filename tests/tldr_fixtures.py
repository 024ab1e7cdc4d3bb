"""Small files shaped like the real TL;DR splits, and a tiny "pretrained" policy to run them with.

Nothing is downloaded. The schemas are those of the hub datasets (checked against their cards):

* ``vwxyzjn/summarize_from_feedback_tldr_3_filtered`` (splits train/validation/test): ``id,
  subreddit, title, post, summary``, all strings; summaries have NO leading space.
* ``openai/summarize_from_feedback`` config "comparisons" (splits train/validation): ``info
  {id, post, title, subreddit, site, article}``, ``summaries`` (list of ``{text, policy,
  note}``), ``choice`` (int32), ``worker``, ``batch``, ``split`` (strings), ``extra
  {confidence}`` (int32). Summary texts start with a space. The validation split also holds
  CNN/DM comparisons (``batch`` in ``batch0_cnndm``/``cnndm0``/``cnndm2``; ``info.post`` and
  ``info.subreddit`` null, ``info.article`` and ``info.site`` set), which SFD
  (summarize_from_feedback_details/tldr_dataset.py) moves to a ``validation_cnndm`` split.

:func:`write_fixtures` writes, under ``root``::

    sft/{train,validation,test}.parquet     TL;DR posts with reference summaries
    comparisons/train.parquet               TL;DR comparisons
    comparisons/validation.jsonl            TL;DR + CNN/DM comparisons (as the real split)
    policy/                                 a tiny random GPT-NeoX (Pythia's architecture) + BPE
                                            tokenizer with eos <|endoftext|> and no pad token

and returns what it wrote, including the rows that need each edge case: posts too long for the
query budget that can be cut at a newline, newline-free posts that need SFD's one-character
fallback cut, comparison summaries longer than 106 (= 2 x 53) tokens, and CNN/DM rows.

Run as a script to write them for the README's fixture-based command::

    python tests/tldr_fixtures.py /tmp/tldr-fixtures
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

EOS = "<|endoftext|>"
WORDS = ("i my me we he she they you it is was am are be been have had do did not no so but and or if "
         "then when what why how because about with for from to in on at of a the this that there "
         "boyfriend girlfriend friend sister brother mom dad landlord boss coworker roommate cat dog "
         "apartment job work rent money deposit car school class exam wedding party trip house "
         "week month year today yesterday tonight always never really just still again now later "
         "want need think feel know said told asked left moved broke paid kept found lost got went "
         "help advice should would could wrong right fair angry sad happy worried confused tired "
         "new old big small long short good bad best worst first last two three four five").split()
SUBREDDITS = ("relationships", "AskReddit", "personalfinance", "tifu", "legaladvice", "dogs")
POLICIES = ("sup2", "ref", "pretrain12b", "sup4_ppo_rm3")
CNNDM_BATCHES = ("batch0_cnndm", "cnndm0", "cnndm2")  # SFD tldr_dataset.py: cnndm_batches


def _sentence(rng: random.Random, lo: int = 6, hi: int = 14) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    return " ".join(words).capitalize() + "."


def _text(rng: random.Random, n_words: int) -> str:
    out: list[str] = []
    while sum(len(s.split()) for s in out) < n_words:
        out.append(_sentence(rng))
    return " ".join(out)


def _post(rng: random.Random, n_words: int, paragraphs: bool) -> str:
    text = _text(rng, n_words)
    if not paragraphs:
        return text
    sents = text.split(". ")
    paras, k = [], 0
    while k < len(sents):
        step = rng.randint(2, 4)
        paras.append(". ".join(sents[k:k + step]))
        k += step
    return "\n\n".join(p if p.endswith(".") else p + "." for p in paras)


def train_tokenizer(texts: list[str], vocab_size: int = 600):
    """A byte-level BPE like GPT-2/Pythia's (eos ``<|endoftext|>``, no pad token), trained on ``texts``.

    The vocabulary holds every fixture word as one token, so token counts are close to word
    counts (punctuation and newlines are tokens too)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def _sft_row(rng: random.Random, i: int, n_words: int, paragraphs: bool, summary_words: int) -> dict:
    return {"id": f"t3_fx{i:04d}", "subreddit": rng.choice(SUBREDDITS), "title": _sentence(rng, 4, 9)[:-1],
            "post": _post(rng, n_words, paragraphs), "summary": _text(rng, summary_words)}


def _comparison(rng: random.Random, i: int, split: str, n_words: int, paragraphs: bool,
                words: tuple[int, int]) -> dict:
    info = {"id": f"t3_cx{i:04d}", "post": _post(rng, n_words, paragraphs), "title": _sentence(rng, 4, 9)[:-1],
            "subreddit": rng.choice(SUBREDDITS), "site": None, "article": None}
    summaries = [{"text": " " + _text(rng, w), "policy": rng.choice(POLICIES), "note": None} for w in words]
    return {"info": info, "summaries": summaries, "choice": rng.randint(0, 1), "worker": f"w{rng.randint(1, 40)}",
            "batch": f"batch{rng.randint(3, 22)}", "split": split, "extra": {"confidence": rng.randint(1, 9)}}


def _cnndm_comparison(rng: random.Random, i: int, batch: str) -> dict:
    info = {"id": f"cnndm_{i:04d}", "post": None, "title": _sentence(rng, 4, 9)[:-1], "subreddit": None,
            "site": rng.choice(("cnn", "dailymail")), "article": _post(rng, 120, True)}
    summaries = [{"text": " " + _text(rng, rng.randint(20, 40)), "policy": rng.choice(POLICIES), "note": None}
                 for _ in range(2)]
    return {"info": info, "summaries": summaries, "choice": rng.randint(0, 1), "worker": f"w{rng.randint(1, 40)}",
            "batch": batch, "split": "valid2", "extra": {"confidence": rng.randint(1, 9)}}


def write_fixtures(root: str | Path, seed: int = 0, n_sft_train: int = 24, n_pref_train: int = 24,
                   long_words: int = 400) -> dict:
    """Write the fixture splits and the tiny policy under ``root``; returns a dict with the
    paths (``sft``, ``comparisons``, ``policy``) and the ids of the edge-case rows.

    ``long_words``: words of the over-long posts (the query budget of the README command is 512
    tokens; 400 words make ~550: cut by a few dozen tokens, as real over-long posts are)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    rng = random.Random(seed)
    sft: dict[str, list[dict]] = {}
    for split, n in (("train", n_sft_train), ("validation", 8), ("test", 8)):
        rows = []
        for k in range(n):
            i = len(rows) + 1000 * len(sft)
            if k == 0:  # too long, paragraphs: cut at the last newline
                rows.append(_sft_row(rng, i, long_words, True, 20))
            elif k == 1:  # too long, no newline at all: SFD's one-character fallback
                rows.append(_sft_row(rng, i, long_words, False, 20))
            else:
                rows.append(_sft_row(rng, i, rng.randint(30, 120), rng.random() < 0.7, rng.randint(5, 30)))
        sft[split] = rows
    prefs: dict[str, list[dict]] = {"train": [], "validation": []}
    for split, n in (("train", n_pref_train), ("validation", 12)):
        rows = prefs[split]
        for k in range(n):
            i = len(rows) + 1000 * (split == "validation")
            tag = "train" if split == "train" else "valid1"
            if k == 0:  # a summary longer than 106 tokens (SFD keeps up to 169)
                rows.append(_comparison(rng, i, tag, 80, True, (rng.randint(10, 30), 120)))
            elif k == 1:  # newline-free over-long post
                rows.append(_comparison(rng, i, tag, long_words, False, (20, 25)))
            else:
                rows.append(_comparison(rng, i, tag, rng.randint(30, 120), rng.random() < 0.7,
                                        (rng.randint(5, 40), rng.randint(5, 40))))
    # the real validation split interleaves CNN/DM comparisons with the TL;DR ones
    for j, batch in enumerate(CNNDM_BATCHES):
        prefs["validation"].insert(2 + 3 * j, _cnndm_comparison(rng, j, batch))

    (root / "sft").mkdir(parents=True, exist_ok=True)
    (root / "comparisons").mkdir(parents=True, exist_ok=True)
    for split, rows in sft.items():
        pq.write_table(pa.Table.from_pylist(rows), root / "sft" / f"{split}.parquet")
    pq.write_table(pa.Table.from_pylist(prefs["train"]), root / "comparisons" / "train.parquet")
    with open(root / "comparisons" / "validation.jsonl", "w", encoding="utf-8") as f:
        for row in prefs["validation"]:
            f.write(json.dumps(row) + "\n")

    texts = [r[k] for rows in sft.values() for r in rows for k in ("title", "post", "summary")]
    texts += [s["text"] for rows in prefs.values() for r in rows for s in r["summaries"]]
    texts += ["SUBREDDIT: r/" + s for s in SUBREDDITS] + ["TITLE: POST: TL;DR:"]
    tokenizer = train_tokenizer(texts)
    write_tiny_policy(root / "policy", tokenizer, seed=seed)
    return {"root": root, "sft": root / "sft", "comparisons": root / "comparisons", "policy": root / "policy",
            "sft_rows": sft, "pref_rows": prefs,
            "cnndm_validation_rows": sum(r["batch"] in CNNDM_BATCHES for r in prefs["validation"])}


def write_tiny_policy(out: Path, tokenizer, seed: int = 0) -> Path:
    """``save_pretrained`` a 1-layer GPT-NeoX of width 32 (random weights) with ``tokenizer``."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(cfg)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/tldr_fixtures.py OUT_DIR")
    info = write_fixtures(sys.argv[1])
    print(f"wrote {info['sft']}, {info['comparisons']} and {info['policy']}")
