"""TL;DR data: loading, Huang's preprocessing and row validation.

The one data path of every stage, for the real TL;DR datasets and for ``tldr-synth``
(which writes the same schemas):

* SFT rows (``vwxyzjn/summarize_from_feedback_tldr_3_filtered``): ``id, subreddit, title,
  post, summary`` (all str).
* Preference rows (``openai/summarize_from_feedback`` "comparisons"): ``info {id, post,
  title, subreddit}``, ``summaries`` (2 x ``{text, policy, note?}``), ``choice`` (0/1), and
  optionally flattened ``chosen``/``rejected`` texts (tldr-synth writes them).

Huang et al. 2024 (arXiv 2403.17031) preprocessing, as in SFD's ``tldr_dataset.py``:

* query = ``"SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:"``
  (detail: "Prompt/query format"), and while it is longer than ``max_query_length`` (512)
  tokens the post is cut at its last newline (detail: "truncate at the last newline"), or,
  when no newline is left, by one character (SFD's ``process_query``).
  Queries are not padded here; the collators pad (left for generation).
* reference response = ``" {summary}<eos>"`` (detail: "a leading space and EOS"); SFD
  drops references longer than ``response_length`` (53) tokens, so they are bad rows here.
* the "comparisons" validation split also holds CNN/DM comparisons (an ``info.article``
  instead of a post); SFD moves them to a separate ``validation_cnndm`` split. Here they are
  left out of the TL;DR splits and counted (``SkipReport.filtered``), whatever
  ``skip_bad_rows`` says.
* RM responses may be up to 169 tokens on real TL;DR (SFD's ``max_rm_response_length``):
  :func:`pref_response_budget`.

Every malformed row raises :class:`DataError` naming file, row and field, or with
``skip_bad_rows=True`` is skipped and counted in a :class:`SkipReport`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional, Sequence

from rlhflab.data.errors import DataError, SkipReport

log = logging.getLogger(__name__)

QUERY_FORMAT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
SFT_COLUMNS = ("id", "subreddit", "title", "post", "summary")
INFO_FIELDS = ("id", "post", "title", "subreddit")
FILE_EXTENSIONS = (".jsonl", ".json", ".parquet", ".arrow")
PREFERENCE_HF_NAME = "openai/summarize_from_feedback"

# Short stable reasons under which SkipReport counts skipped rows.
R_BAD_JSON = "bad JSON"
R_MISSING = "missing field"
R_TYPE = "wrong type"
R_EMPTY = "empty text"
R_NO_POST = "no post"
R_QUERY_LONG = "query too long"
R_RESPONSE_LONG = "response too long"
R_CHOICE = "bad choice"
R_SUMMARIES = "bad summaries"
R_DISAGREE = "chosen/rejected disagree with summaries"
R_CNNDM = "CNN/DM"  # filtered by design (SkipReport.filtered), not a bad row

# SFD (summarize_from_feedback_details/tldr_dataset.py, ``cnndm_batches``): the batches of the
# openai/summarize_from_feedback "comparisons" validation split that are CNN/DM articles.
CNNDM_BATCHES = ("batch0_cnndm", "cnndm0", "cnndm2")
# SFD's token budgets for real TL;DR (tldr_dataset.py ``tldr_params``): chosen/rejected
# responses of the RM data are up to 169 tokens (EOS included); SFT references up to 53.
SFD_TLDR_RM_RESPONSE_LENGTH = 169
EOS_TEXT = "<|endoftext|>"  # SFD's preprocessed datasets store chosen/rejected as text + this


class SFTExample(NamedTuple):
    """One SFT example. ``query_ids``: [Q] tokens (Q <= max_query_length, unpadded);
    ``response_ids``: [R] tokens of ``response`` followed by EOS (R <= response_length).

    ``subreddit``/``title``/``post`` are the row's original fields (post untruncated), kept for
    evaluation (title-copy rate, tldr-synth gold judge).
    """

    id: str
    query: str
    query_ids: list[int]
    response: str  # " {summary}" -- exactly the text that response_ids[:-1] encodes
    response_ids: list[int]
    subreddit: str
    title: str
    post: str


class PrefExample(NamedTuple):
    """One comparison. ``chosen_ids``/``rejected_ids``: tokens of ``chosen``/``rejected``
    followed by EOS, each at most ``max_response_length`` (the RM stage uses
    :func:`pref_response_budget`: 169 for real TL;DR, 2 x response_length for tldr-synth)."""

    id: str
    query: str
    query_ids: list[int]
    chosen: str  # " {summaries[choice].text}"
    rejected: str  # " {summaries[1 - choice].text}"
    chosen_ids: list[int]
    rejected_ids: list[int]
    subreddit: str
    title: str
    post: str


class BadRow(NamedTuple):
    """Placeholder left by :func:`load_split` (``skip_bad_rows=True``) at a row it could not
    parse, so later row indices still match the file; the tokenizers count it as skipped."""

    error: DataError


# ----------------------------------------------------------------------------- loading
def load_split(source: str, split: str, kind: Literal["sft", "preference"],
               skip_bad_rows: bool = False) -> tuple[list[Any], str]:
    """Read one split of SFT or preference rows.

    Args:
        source: a local file (``.jsonl``/``.json``/``.parquet``/``.arrow``); a local folder
            holding ``{split}.<ext>``, or the data root of tldr-synth holding
            ``sft/{split}.jsonl`` and ``preference/{split}.jsonl`` (the subfolder is picked by
            ``kind``), or a ``datasets.save_to_disk`` folder; or an HF hub dataset name.
        split: ``train``, ``validation`` or ``test`` (ignored for a single file).
        kind: ``"sft"`` or ``"preference"``.
        skip_bad_rows: if True, an unparsable JSON line becomes a :class:`BadRow` placeholder
            (counted later by the tokenize functions) instead of raising.

    Returns:
        ``(rows, file_label)``: the raw rows (dicts, row index = position; for JSON Lines the
        0-based line index) and the label errors use to name the file.

    Raises:
        DataError: missing file/folder, unreadable file, bad JSON line, offline hub access.
    """
    if kind not in ("sft", "preference"):
        raise ValueError(f"load_split: kind must be 'sft' or 'preference', got {kind!r}")
    path = Path(source).expanduser()
    if path.is_file():
        return _read_file(path, skip_bad_rows), str(path)
    if path.is_dir():
        return _read_folder(path, split, kind, skip_bad_rows)
    if _looks_like_path(source):
        raise DataError(str(source), None, None, "no such file or folder")
    return _read_hub(source, split, kind)


def _looks_like_path(source: str) -> bool:
    # A hub name is exactly "owner/name"; anything else that does not exist is a missing path.
    return (source.startswith((".", "/", "~")) or source.lower().endswith(FILE_EXTENSIONS)
            or source.count("/") != 1)


def _read_folder(folder: Path, split: str, kind: str, skip_bad_rows: bool) -> tuple[list[Any], str]:
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        return _read_saved_dataset(folder, split)
    bases = [folder / kind, folder] if (folder / kind).is_dir() else [folder]
    looked = []
    for base in bases:
        for ext in FILE_EXTENSIONS:
            f = base / f"{split}{ext}"
            looked.append(str(f))
            if f.is_file():
                return _read_file(f, skip_bad_rows), str(f)
    raise DataError(str(folder), None, None, f"no '{split}' split for {kind} data; looked for {', '.join(looked)}")


def _read_saved_dataset(folder: Path, split: str) -> tuple[list[Any], str]:
    import datasets

    label = f"{folder}[{split}]"
    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:  # noqa: BLE001 - any failure here is an unreadable folder
        raise DataError(str(folder), None, None, f"cannot read saved dataset ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(str(folder), None, None, f"no '{split}' split (has: {', '.join(ds)})")
        ds = ds[split]
    return ds.to_list(), label


def _read_hub(name: str, split: str, kind: str) -> tuple[list[Any], str]:
    import datasets

    label = f"{name}[{split}]"
    config = "comparisons" if kind == "preference" and name == PREFERENCE_HF_NAME else None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - offline, unknown name, unknown split: all the same to the user
        hint = "offline? pass a local file or folder instead"
        if "scripts are no longer supported" in str(e):
            # openai/summarize_from_feedback is a loading-script dataset, which datasets>=4 refuses.
            hint = ("datasets>=4 cannot run this dataset's loading script; use a parquet copy such as SFD's "
                    "vwxyzjn/summarize_from_feedback_oai_preprocessing_1706381144, or local files")
        raise DataError(label, None, None,
                        f"cannot load from the Hugging Face hub ({type(e).__name__}: {e}); {hint}") from None
    return ds.to_list(), label


def _read_file(path: Path, skip_bad_rows: bool) -> list[Any]:
    suffix = path.suffix.lower()
    label = str(path)
    if suffix in (".jsonl", ".json"):
        return _read_json(path, skip_bad_rows)
    try:
        import pyarrow as pa

        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix == ".arrow":
            # datasets' save_to_disk writes the IPC *stream* format; pyarrow's feather/file
            # writer the IPC *file* format. Accept both.
            with pa.memory_map(str(path)) as src:
                try:
                    return pa.ipc.open_stream(src).read_all().to_pylist()
                except pa.ArrowInvalid:
                    src.seek(0)
                    return pa.ipc.open_file(src).read_all().to_pylist()
    except (OSError, ValueError) as e:  # ArrowInvalid is a ValueError
        raise DataError(label, None, None, f"cannot read {suffix[1:]} file ({type(e).__name__}: {e})") from None
    raise DataError(label, None, None, f"unsupported file type '{suffix}' (use one of {', '.join(FILE_EXTENSIONS)})")


def _read_json(path: Path, skip_bad_rows: bool) -> list[Any]:
    label = str(path)
    data = path.read_bytes()
    if path.suffix.lower() == ".json" and data.lstrip()[:1] == b"[":
        try:  # a .json file holding one array of row objects
            rows = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(label, None, None, f"invalid JSON array ({e})", R_BAD_JSON) from None
        return rows
    lines = data.split(b"\n")
    while lines and not lines[-1].strip():  # the final newline(s) are not rows
        lines.pop()
    rows: list[Any] = []
    for i, line in enumerate(lines):
        try:
            text = line.decode("utf-8")
            if not text.strip():
                raise ValueError("blank line (JSON Lines needs one object per line)")
            row = json.loads(text)
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            err = DataError(label, i, None, f"invalid JSON line ({e})", R_BAD_JSON)
            if not skip_bad_rows:
                raise err from None
            row = BadRow(err)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------- query format
def format_query(subreddit: str, title: str, post: str) -> str:
    """Huang's (and SFD's) TL;DR query: ``SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:``."""
    return QUERY_FORMAT.format(subreddit=subreddit, title=title, post=post)


def _check_tokenizer(tokenizer: Any) -> None:
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError("the tokenizer has no eos_token; set one (reference responses end with EOS, Huang's ' {summary}<eos>')")
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError("the tokenizer has no pad_token; set one before loading data, e.g. "
                         "tokenizer.add_special_tokens({'pad_token': '[PAD]'}) as SFD does for Pythia")


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Batch-encode without special tokens (queries and responses are concatenated later)."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _truncated_query_ids(tokenizer: Any, fields: Sequence[tuple[str, str, str]], max_query_length: int,
                         chunk: int = 32) -> tuple[list[Optional[list[int]]], list[str]]:
    r"""Huang's truncation for many rows at once, cutting as SFD's ``process_query`` does.

    For each ``(subreddit, title, post)``: while the tokenised query is longer than
    ``max_query_length``, the post is cut before its last newline (``post[:post.rindex("\n")]``,
    so ``"a\n\nb"`` becomes ``"a\n"``, then ``"a"``) or, when no newline is left, shortened by one
    character (SFD: ``truncate_text="\n"`` with the ``i = -1`` fallback,
    summarize_from_feedback_details/tldr_dataset.py). The first candidate in that sequence whose
    query fits is kept, so the result is SFD's. Candidates of all rows still too long are encoded
    in one batch per round: one newline cut per row, or up to ``chunk`` successive one-character
    cuts (all of which SFD would try, in this order).

    Returns ``(ids, posts)``: the (possibly truncated) posts and their query ids, None where the
    query cannot fit before the post is cut to nothing or whitespace. (That is the one departure
    from SFD, which cuts on to an empty post and keeps a query with an empty post if it fits.)
    """
    posts = [p for _, _, p in fields]
    ids: list[Optional[list[int]]] = list(_encode(tokenizer, [format_query(s, t, p) for s, t, p in fields]))
    pending = [i for i, x in enumerate(ids) if len(x) > max_query_length]
    while pending:
        candidates: list[tuple[int, str]] = []
        for i in pending:
            post = posts[i]
            cut = post.rfind("\n")
            if cut >= 0:
                candidates.append((i, post[:cut]))
            else:
                candidates.extend((i, post[: len(post) - k]) for k in range(1, min(chunk, len(post)) + 1))
        encoded = _encode(tokenizer, [format_query(fields[i][0], fields[i][1], c) for i, c in candidates])
        settled: set[int] = set()
        for (i, post), x in zip(candidates, encoded):
            if i in settled:
                continue
            if not post.strip():
                ids[i] = None  # cannot fit: nothing of the post left
                settled.add(i)
                continue
            posts[i] = post
            if len(x) <= max_query_length:
                ids[i] = x
                settled.add(i)
        pending = [i for i in pending if i not in settled]
    return ids, posts


def build_query_ids(tokenizer: Any, subreddit: str, title: str, post: str, max_query_length: int) -> list[int]:
    """Token ids of the query for one post, truncated by Huang's rule (see :func:`_truncated_query_ids`).

    Returns an unpadded list of at most ``max_query_length`` ids.

    Raises:
        DataError: ``field 'post'`` when the query cannot fit even with the post cut to its
            first character.
    """
    ids, _ = _truncated_query_ids(tokenizer, [(subreddit, title, post)], max_query_length)
    if ids[0] is None:
        raise DataError("query", None, "post", _too_long_problem(max_query_length), R_QUERY_LONG)
    return ids[0]


def _too_long_problem(max_query_length: int) -> str:
    return (f"post cannot fit in {max_query_length} tokens even after truncation (at its newlines, then "
            "character by character): the subreddit and title alone are too long")


def response_text(text: str) -> str:
    """Normalise a summary to Huang's response text ``" {summary}"`` (one leading space).

    The SFT summaries have no leading space, the openai comparison texts already have one
    (SFD's comments on both); stripping first gives the same ``" {summary}<eos>"`` for both.
    """
    return " " + text.strip()


# -------------------------------------------------------------------------- validation
def _describe(value: Any) -> str:
    """``2 (int)``, ``'1' (str)``, ``True (bool)``, ``null``, ``list``: what a bad value was."""
    if value is None:
        return "null"
    if isinstance(value, (bool, int, float, str)):
        shown = repr(value)
        return f"{shown[:40] + '...' if len(shown) > 40 else shown} ({type(value).__name__})"
    return type(value).__name__


def _get_str(container: Any, key: str, field: str, file: str, row: int, nonempty: bool = False) -> str:
    if key not in container:
        raise DataError(file, row, field, "missing", R_MISSING)
    value = container[key]
    if value is None:
        raise DataError(file, row, field, "is null", R_MISSING)
    if not isinstance(value, str):
        raise DataError(file, row, field, f"expected a string, got {_describe(value)}", R_TYPE)
    if nonempty and not value.strip():
        raise DataError(file, row, field, "is empty or whitespace only", R_EMPTY)
    return value


def _as_row(row: Any, file: str, i: int) -> dict:
    if isinstance(row, BadRow):
        raise row.error
    if not isinstance(row, dict):
        raise DataError(file, i, None, f"expected a row object, got {type(row).__name__}", R_TYPE)
    return row


def _validate_sft_row(row: Any, file: str, i: int) -> tuple[str, str, str, str, str]:
    row = _as_row(row, file, i)
    return (_get_str(row, "id", "id", file, i), _get_str(row, "subreddit", "subreddit", file, i),
            _get_str(row, "title", "title", file, i), _get_str(row, "post", "post", file, i, nonempty=True),
            _get_str(row, "summary", "summary", file, i, nonempty=True))


def is_cnndm_row(row: Any) -> bool:
    """True for a CNN/DM comparison of ``openai/summarize_from_feedback``: its ``batch`` is one of
    SFD's :data:`CNNDM_BATCHES`, or (files without ``batch``) its ``info`` has an article and no post."""
    if not isinstance(row, dict):
        return False
    if row.get("batch") in CNNDM_BATCHES:
        return True
    info = row.get("info")
    return isinstance(info, dict) and info.get("post") is None and bool(info.get("article"))


def pref_response_budget(task: str, response_length: int, max_pref_response_length: Optional[int] = None) -> int:
    """Longest chosen/rejected response (tokens, EOS included) kept for reward-model data.

    ``max_pref_response_length`` when set; else SFD's 169 for real TL;DR (``task="tldr"``:
    the labelled summaries came from many policies, some far longer than the 53-token SFT
    references), and ``2 * response_length`` for tldr-synth (its labelled summaries are at
    most ~78 tokens, so this keeps every one).
    """
    if max_pref_response_length is not None:
        return max_pref_response_length
    return SFD_TLDR_RM_RESPONSE_LENGTH if task == "tldr" else 2 * response_length


def _validate_pref_row(row: Any, file: str, i: int) -> tuple[str, str, str, str, str, str]:
    """-> (id, subreddit, title, post, chosen_text, rejected_text) of a valid comparison row."""
    row = _as_row(row, file, i)
    info = row.get("info")
    if info is None:
        raise DataError(file, i, "info", "missing" if "info" not in row else "is null", R_MISSING)
    if not isinstance(info, dict):
        raise DataError(file, i, "info", f"expected an object, got {_describe(info)}", R_TYPE)
    id_ = _get_str(info, "id", "info.id", file, i)
    if info.get("post") is None:  # CNN/DM rows (info.article) were filtered out before
        raise DataError(file, i, "info.post", "missing or null; only TL;DR posts are used, "
                        "set data.skip_bad_rows=true to skip such rows", R_NO_POST)
    post = _get_str(info, "post", "info.post", file, i, nonempty=True)
    title = _get_str(info, "title", "info.title", file, i)
    subreddit = _get_str(info, "subreddit", "info.subreddit", file, i)

    if "choice" not in row or row["choice"] is None:
        raise DataError(file, i, "choice", "missing" if "choice" not in row else "is null", R_MISSING)
    choice = row["choice"]
    # bool is an int subclass in Python: True would silently mean summaries[1].
    if isinstance(choice, bool) or not isinstance(choice, int) or choice not in (0, 1):
        raise DataError(file, i, "choice", f"must be the integer 0 or 1, got {_describe(choice)}", R_CHOICE)

    summaries = row.get("summaries")
    if summaries is None:
        raise DataError(file, i, "summaries", "missing" if "summaries" not in row else "is null", R_MISSING)
    if not isinstance(summaries, list):
        raise DataError(file, i, "summaries", f"expected a list of 2 summaries, got {_describe(summaries)}", R_TYPE)
    if len(summaries) != 2:
        raise DataError(file, i, "summaries", f"expected exactly 2 summaries, got {len(summaries)}", R_SUMMARIES)
    texts = []
    for k, s in enumerate(summaries):
        if not isinstance(s, dict):
            raise DataError(file, i, f"summaries[{k}]", f"expected an object with 'text', got {_describe(s)}", R_SUMMARIES)
        texts.append(_get_str(s, "text", f"summaries[{k}].text", file, i, nonempty=True))
    chosen, rejected = texts[choice], texts[1 - choice]

    # tldr-synth also writes flattened chosen/rejected; when present they must agree with
    # summaries[choice] (compared after stripping, as both are normalised by response_text).
    for col, expected, idx in (("chosen", chosen, choice), ("rejected", rejected, 1 - choice)):
        value = row.get(col)
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataError(file, i, col, f"expected a string, got {_describe(value)}", R_TYPE)
        value = value.strip()
        if value.endswith(EOS_TEXT):  # SFD's preprocessed copies: f"{text}<|endoftext|>"
            value = value[: -len(EOS_TEXT)].strip()
        if value != expected.strip():
            raise DataError(file, i, col, f"does not match summaries[{idx}].text (choice={choice})", R_DISAGREE)
    return id_, subreddit, title, post, chosen, rejected


# -------------------------------------------------------------------------- tokenizing
def tokenize_sft(rows: Sequence[Any], tokenizer: Any, max_query_length: int, response_length: int,
                 file_label: str, skip_bad_rows: bool = False) -> tuple[list[SFTExample], SkipReport]:
    """Validate and tokenise SFT rows with Huang's preprocessing.

    Args:
        rows: raw rows from :func:`load_split` (``id, subreddit, title, post, summary``).
        tokenizer: a fast HF tokenizer with ``eos_token`` and ``pad_token`` set.
        max_query_length: query token budget (Huang: 512).
        response_length: longest reference response in tokens, EOS included (Huang: 53).
        file_label: names the file in errors.
        skip_bad_rows: skip and count malformed rows instead of raising on the first.

    Returns:
        ``(examples, report)`` -- examples in file order; ``report.seen == len(rows)``.

    Raises:
        DataError: on the first bad row (file, row, field named) unless ``skip_bad_rows``.
        ValueError: if the tokenizer lacks an EOS or PAD token.
    """
    _check_tokenizer(tokenizer)
    report = SkipReport(file_label)
    report.seen = len(rows)
    good: list[tuple[int, tuple[str, str, str, str, str]]] = []
    for i, row in enumerate(rows):
        try:
            good.append((i, _validate_sft_row(row, file_label, i)))
        except DataError as e:
            if not skip_bad_rows:
                raise
            report.add(e)

    query_ids, posts = _truncated_query_ids(tokenizer, [(s, t, p) for _, (_, s, t, p, _) in good], max_query_length)
    responses = [response_text(summary) for _, (*_, summary) in good]
    eos = tokenizer.eos_token_id
    response_ids = [ids + [eos] for ids in _encode(tokenizer, responses)]

    examples: list[SFTExample] = []
    for k, (i, (id_, subreddit, title, post, _)) in enumerate(good):
        try:
            if query_ids[k] is None:
                raise DataError(file_label, i, "post", _too_long_problem(max_query_length), R_QUERY_LONG)
            if len(response_ids[k]) > response_length:
                # SFD keeps only references of at most 53 tokens (EOS included).
                raise DataError(file_label, i, "summary",
                                f"reference response is {len(response_ids[k])} tokens with EOS, "
                                f"more than response_length={response_length}", R_RESPONSE_LONG)
        except DataError as e:
            if not skip_bad_rows:
                raise
            report.add(e)
            continue
        examples.append(SFTExample(id_, format_query(subreddit, title, posts[k]), query_ids[k],
                                   responses[k], response_ids[k], subreddit, title, post))
    return examples, report


def tokenize_preferences(rows: Sequence[Any], tokenizer: Any, max_query_length: int, response_length: int,
                         file_label: str, skip_bad_rows: bool = False,
                         max_response_length: Optional[int] = None) -> tuple[list[PrefExample], SkipReport]:
    """Validate and tokenise comparison rows (``info``, ``summaries``, ``choice``).

    Chosen/rejected are ``response_text(summaries[choice].text)`` / ``...[1 - choice]`` + EOS.
    Unlike SFT references, labelled summaries may be longer than ``response_length`` (they
    came from other policies; SFD keeps RM responses up to 169 tokens for a 53-token policy),
    so they are kept up to ``max_response_length`` tokens (default ``2 * response_length``)
    and longer ones are bad rows rather than silently truncated (truncation would cut off the
    EOS the RM scores at).

    CNN/DM comparisons (:func:`is_cnndm_row`) are not TL;DR rows: they are left out and
    counted in ``report.filtered[R_CNNDM]`` (SFD moves them to a ``validation_cnndm`` split).

    Returns ``(examples, report)``; raises like :func:`tokenize_sft`.
    """
    _check_tokenizer(tokenizer)
    limit = 2 * response_length if max_response_length is None else max_response_length
    report = SkipReport(file_label)
    report.seen = len(rows)
    good: list[tuple[int, tuple[str, str, str, str, str, str]]] = []
    for i, row in enumerate(rows):
        if is_cnndm_row(row):
            report.filtered[R_CNNDM] += 1
            continue
        try:
            good.append((i, _validate_pref_row(row, file_label, i)))
        except DataError as e:
            if not skip_bad_rows:
                raise
            report.add(e)

    query_ids, posts = _truncated_query_ids(tokenizer, [(s, t, p) for _, (_, s, t, p, _, _) in good], max_query_length)
    chosen = [response_text(c) for _, (*_, c, _) in good]
    rejected = [response_text(r) for _, (*_, r) in good]
    eos = tokenizer.eos_token_id
    encoded = _encode(tokenizer, chosen + rejected)
    chosen_ids = [ids + [eos] for ids in encoded[: len(good)]]
    rejected_ids = [ids + [eos] for ids in encoded[len(good):]]

    examples: list[PrefExample] = []
    for k, (i, (id_, subreddit, title, post, _, _)) in enumerate(good):
        try:
            if query_ids[k] is None:
                raise DataError(file_label, i, "info.post", _too_long_problem(max_query_length), R_QUERY_LONG)
            for col, ids in (("chosen", chosen_ids[k]), ("rejected", rejected_ids[k])):
                if len(ids) > limit:
                    raise DataError(file_label, i, col, f"{col} response is {len(ids)} tokens with EOS, more than "
                                    f"the {limit} allowed for reward-model data (data.max_pref_response_length)",
                                    R_RESPONSE_LONG)
        except DataError as e:
            if not skip_bad_rows:
                raise
            report.add(e)
            continue
        examples.append(PrefExample(id_, format_query(subreddit, title, posts[k]), query_ids[k], chosen[k], rejected[k],
                                    chosen_ids[k], rejected_ids[k], subreddit, title, post))
    return examples, report


# ------------------------------------------------------------------------ convenience
def _skip_log(report: SkipReport) -> None:
    if report.total or report.filtered:  # the CLI shows warnings only: filtered rows are never silent
        log.warning("%s", report)


def load_sft(source: str, split: str, tokenizer: Any, max_query_length: int, response_length: int,
             skip_bad_rows: bool = False) -> tuple[list[SFTExample], SkipReport]:
    """:func:`load_split` + :func:`tokenize_sft`; logs a warning when rows were skipped."""
    rows, label = load_split(source, split, "sft", skip_bad_rows=skip_bad_rows)
    examples, report = tokenize_sft(rows, tokenizer, max_query_length, response_length, label, skip_bad_rows)
    _skip_log(report)
    return examples, report


def load_preferences(source: str, split: str, tokenizer: Any, max_query_length: int, response_length: int,
                     skip_bad_rows: bool = False, max_response_length: Optional[int] = None
                     ) -> tuple[list[PrefExample], SkipReport]:
    """:func:`load_split` + :func:`tokenize_preferences`; logs a warning when rows were skipped."""
    rows, label = load_split(source, split, "preference", skip_bad_rows=skip_bad_rows)
    examples, report = tokenize_preferences(rows, tokenizer, max_query_length, response_length, label,
                                            skip_bad_rows, max_response_length)
    _skip_log(report)
    return examples, report
