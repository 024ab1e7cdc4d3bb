"""TRL's standard dataset formats (``data.task=standard``), turned into the stages' examples.

The formats are those of TRL's "Dataset formats and types" guide
(https://huggingface.co/docs/trl/dataset_formats), each *standard* (strings) or
*conversational* (lists of ``{"role", "content"}`` messages):

=======================  ===========================================  ===========================
type                     standard                                     conversational
=======================  ===========================================  ===========================
prompt-only              ``{"prompt": "The sky is"}``                 ``{"prompt": [{user}]}``
prompt-completion        ``{"prompt": ..., "completion": " blue."}``  ``prompt`` + ``completion`` lists
preference (explicit)    ``{"prompt", "chosen", "rejected"}``         the same as lists
preference (implicit)    ``{"chosen", "rejected"}``, shared prefix    lists sharing leading messages
language modeling (chat) --                                           ``{"messages": [...]}``
=======================  ===========================================  ===========================

Which stage reads what:

* SFT (:func:`load_sft_data`): prompt-completion, or ``messages`` whose last message is the
  assistant's (the completion; the messages before it are the prompt). Loss on the completion.
* RM (:func:`load_preference_data`): preferences; with an implicit prompt, the prompt is the
  longest common prefix of ``chosen`` and ``rejected`` (characters for strings, whole
  messages for conversations), as TRL's ``extract_prompt`` does; for strings a space just
  before the first difference goes to the responses (TRL does the same).
* PPO (:func:`load_prompt_data`): the prompt of any of the above (``data.prompt_dataset``,
  default ``data.sft_dataset``).

Conversations are rendered with the tokenizer's chat template (``apply_chat_template``):
the prompt with ``add_generation_prompt=True``, a response as the rendering of
prompt + response minus the rendered prompt (TRL's ``maybe_apply_chat_template`` does the
same). A tokenizer without a template uses ``data.chat_template`` (Jinja text or a ``.jinja``
file), which is then set on the tokenizer so that the saved policy keeps it; with neither,
a :class:`DataError` names ``model.tokenizer`` and ``data.chat_template``.

Tokens: the prompt is encoded without special tokens (a template's own control tokens are
in its text), a response as ``tokens(text) + [eos]``. Unlike the TL;DR recipe (Huang's cut
at the last newline), a prompt longer than ``data.max_query_length`` or a response longer than
its budget is a bad row, never silently truncated. Columns are renamed by ``data.columns``
(``{canonical: yours}``), splits by ``data.splits``; files are read by
:func:`rlhflab.data.tldr.load_split` (``.jsonl``/``.json``/``.parquet``/``.arrow``, folders,
``save_to_disk`` folders, hub names). Bad rows raise :class:`DataError` naming file, row
and field (the user's column name), or with ``data.skip_bad_rows`` are counted.

For ``data.task`` ``tldr``/``tldr-synth`` the ``load_*_data`` functions call the TL;DR
loaders of :mod:`rlhflab.data.tldr` unchanged, so every stage reads data through them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional, Sequence

from rlhflab.data.errors import DataError, SkipReport
from rlhflab.data.tldr import (
    R_EMPTY,
    R_MISSING,
    R_QUERY_LONG,
    R_RESPONSE_LONG,
    R_TYPE,
    PrefExample,
    SFTExample,
    _as_row,
    _check_tokenizer,
    _describe,
    _encode,
    load_preferences,
    load_sft,
    load_split,
)

log = logging.getLogger(__name__)

R_FORMAT = "wrong format"
R_MESSAGES = "bad messages"
R_NO_PROMPT = "no shared prompt"
R_TEMPLATE = "chat template mismatch"

Kind = Literal["sft", "preference", "prompt"]


class PromptExample(NamedTuple):
    """One PPO prompt of a standard dataset: what ``stages.ppo.Prompt`` needs (``query_ids``,
    ``query``, ``post``; ``post`` is the prompt's plain text, for signals)."""

    id: str
    query: str
    query_ids: list[int]
    post: str


# ------------------------------------------------------------------- configuration
def split_name(cfg, split: str) -> str:
    """``data.splits[split]`` or ``split`` itself."""
    return cfg.data.splits.get(split, split)


def column(cfg, canonical: str) -> str:
    """The user's column for a canonical name (``data.columns``), default the name itself."""
    return cfg.data.columns.get(canonical, canonical)


def _template_text(value: str) -> str:
    p = Path(value).expanduser()
    if len(value) < 4096 and "{" not in value and p.is_file():
        return p.read_text()
    return value


def chat_template(cfg, tokenizer) -> Optional[str]:
    """The template conversations are rendered with: the tokenizer's own, else
    ``data.chat_template`` (set on the tokenizer, so the saved policy keeps it), else None."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    if cfg.data.chat_template:
        tokenizer.chat_template = _template_text(cfg.data.chat_template)
        return tokenizer.chat_template
    return None


# -------------------------------------------------------------------- row parsing
def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """Implicit prompt: ``(prompt, chosen_rest, rejected_rest)`` with ``prompt`` the longest
    common prefix of ``chosen`` and ``rejected`` (strings: characters; lists: messages).

    The semantics of TRL's ``trl.data_utils.extract_prompt``: for strings, when the last
    shared character is a space it is given back to the responses (``"The sky is"`` +
    ``" blue."``). Returns an empty prompt when nothing is shared.
    """
    n = min(len(chosen), len(rejected))
    k = 0
    while k < n and chosen[k] == rejected[k]:
        k += 1
    if isinstance(chosen, str) and k > 0 and chosen[k - 1] == " ":
        k -= 1
    return chosen[:k], chosen[k:], rejected[k:]


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list)


def _check_messages(value: Any, field: str, file: str, i: int) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(file, i, field, f"expected a non-empty list of {{role, content}} messages, got "
                        f"{'an empty list' if isinstance(value, list) else _describe(value)}", R_MESSAGES)
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(file, i, f"{field}[{k}]", f"expected a {{role, content}} object, got {_describe(m)}", R_MESSAGES)
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise DataError(file, i, f"{field}[{k}].{key}", "missing" if key not in m else
                                f"expected a string, got {_describe(m.get(key))}", R_MESSAGES)
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _text_or_messages(row: dict, canonical: str, cfg, file: str, i: int, nonempty: bool = True) -> Any:
    """A field as a string (standard) or a validated message list (conversational)."""
    name = column(cfg, canonical)
    if name not in row:
        raise DataError(file, i, name, "missing", R_MISSING)
    value = row[name]
    if value is None:
        raise DataError(file, i, name, "is null", R_MISSING)
    want = cfg.data.format
    if isinstance(value, str):
        if want == "conversational":
            raise DataError(file, i, name, "expected a list of messages (data.format=conversational), got a string", R_FORMAT)
        if nonempty and not value.strip():
            raise DataError(file, i, name, "is empty or whitespace only", R_EMPTY)
        return value
    if isinstance(value, list):
        if want == "standard":
            raise DataError(file, i, name, "expected a string (data.format=standard), got a list", R_FORMAT)
        return _check_messages(value, name, file, i)
    raise DataError(file, i, name, f"expected a string or a list of messages, got {_describe(value)}", R_TYPE)


def _present(row: dict, cfg, canonical: str) -> bool:
    return row.get(column(cfg, canonical)) is not None


def _columns_hint(row: dict, cfg, wants: str) -> str:
    have = ", ".join(sorted(map(str, row))) or "none"
    return (f"{wants} (this row has columns: {have}; rename yours with data.columns, "
            "e.g. data.columns={prompt: question, completion: answer})")


def _row_id(row: dict, cfg, i: int) -> str:
    value = row.get(column(cfg, "id"))
    return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else str(i)


class _Parsed(NamedTuple):
    """A validated row: prompt and responses, each a string or a message list (same kind)."""

    id: str
    prompt: Any
    responses: tuple  # () prompt-only, (completion,), (chosen, rejected)


def _split_messages(messages: list[dict], field: str, file: str, i: int) -> tuple[list[dict], list[dict]]:
    """``messages`` -> (prompt messages, [final assistant message])."""
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise DataError(file, i, f"{field}[{len(messages) - 1}].role",
                        "the last message must be the assistant's, after at least one prompt message", R_MESSAGES)
    return messages[:-1], messages[-1:]


def parse_row(row: Any, kind: Kind, cfg, file: str, i: int) -> _Parsed:
    """Validate one raw row for a stage: ``sft`` (prompt+completion or messages), ``preference``
    (explicit or implicit prompt) or ``prompt`` (the prompt of any format)."""
    row = _as_row(row, file, i)
    rid = _row_id(row, cfg, i)
    msgs = column(cfg, "messages")
    has = {c: _present(row, cfg, c) for c in ("prompt", "completion", "chosen", "rejected", "messages")}
    if kind == "preference" or (kind == "prompt" and not has["prompt"] and has["chosen"] and has["rejected"]):
        if not (has["chosen"] and has["rejected"]):
            field = column(cfg, "chosen") if not has["chosen"] else column(cfg, "rejected")
            raise DataError(file, i, field, _columns_hint(row, cfg, "missing: preference data needs chosen and rejected"), R_MISSING)
        chosen = _text_or_messages(row, "chosen", cfg, file, i)
        rejected = _text_or_messages(row, "rejected", cfg, file, i)
        if _is_conversation(chosen) != _is_conversation(rejected):
            raise DataError(file, i, column(cfg, "rejected"), "chosen and rejected must both be strings or both message lists", R_FORMAT)
        if has["prompt"]:
            prompt = _text_or_messages(row, "prompt", cfg, file, i)
            if _is_conversation(prompt) != _is_conversation(chosen):
                raise DataError(file, i, column(cfg, "prompt"), "prompt and chosen must both be strings or both message lists", R_FORMAT)
        else:
            prompt, chosen, rejected = extract_prompt(chosen, rejected)
            if not (prompt.strip() if isinstance(prompt, str) else prompt):
                raise DataError(file, i, column(cfg, "chosen"), "no prompt column and chosen/rejected share no prefix "
                                "to take the implicit prompt from", R_NO_PROMPT)
            if not chosen or not rejected:
                raise DataError(file, i, column(cfg, "chosen" if not chosen else "rejected"),
                                "is the shared prefix itself: nothing left to compare after the implicit prompt", R_NO_PROMPT)
        return _Parsed(rid, prompt, (chosen, rejected) if kind == "preference" else ())
    if has["messages"] and not has["prompt"]:
        value = row[msgs]
        if cfg.data.format == "standard":
            raise DataError(file, i, msgs, "a message list, but data.format=standard", R_FORMAT)
        messages = _check_messages(value, msgs, file, i)
        if kind == "prompt" and messages[-1]["role"] != "assistant":
            return _Parsed(rid, messages, ())
        prompt, completion = _split_messages(messages, msgs, file, i)
        return _Parsed(rid, prompt, (completion,) if kind == "sft" else ())
    if not has["prompt"]:
        wants = ("missing: SFT data needs prompt+completion or messages" if kind == "sft"
                 else "missing: prompts come from a prompt column, messages, or chosen/rejected")
        raise DataError(file, i, column(cfg, "prompt"), _columns_hint(row, cfg, wants), R_MISSING)
    prompt = _text_or_messages(row, "prompt", cfg, file, i)
    if kind == "prompt":
        return _Parsed(rid, prompt, ())
    if not has["completion"]:
        raise DataError(file, i, column(cfg, "completion"), _columns_hint(row, cfg, "missing: SFT needs a completion"), R_MISSING)
    completion = _text_or_messages(row, "completion", cfg, file, i)
    if _is_conversation(prompt) != _is_conversation(completion):
        raise DataError(file, i, column(cfg, "completion"), "prompt and completion must both be strings or both message lists", R_FORMAT)
    return _Parsed(rid, prompt, (completion,))


# ---------------------------------------------------------------------- rendering
def _no_template_error(cfg, file: str, i: int, field: str) -> DataError:
    tok = cfg.model.tokenizer or cfg.model.policy or "the task tokenizer"
    return DataError(file, i, field, f"conversational data needs a chat template, and the tokenizer ({tok}) has none: "
                     "set model.tokenizer to one that has a chat_template, or data.chat_template to a Jinja "
                     "template (text or a .jinja file)", R_TEMPLATE)


def render(tokenizer, template: str, prompt: Any, responses: Sequence[Any], file: str, i: int, field: str
           ) -> tuple[str, list[str], str]:
    """-> (prompt text, response texts, prompt plain text). Strings pass through unchanged;
    conversations go through ``apply_chat_template`` (see the module docstring)."""
    if isinstance(prompt, str):
        return prompt, list(responses), prompt
    plain = "\n".join(m["content"] for m in prompt)
    prompt_text = tokenizer.apply_chat_template(prompt, chat_template=template, tokenize=False, add_generation_prompt=True)
    texts = []
    eos = tokenizer.eos_token
    for resp in responses:
        full = tokenizer.apply_chat_template(prompt + resp, chat_template=template, tokenize=False)
        if not full.startswith(prompt_text):
            raise DataError(file, i, field, "the chat template renders prompt + response with another prefix than the prompt "
                            "alone (add_generation_prompt=True); use a template whose generation prompt is a prefix", R_TEMPLATE)
        text = full[len(prompt_text):]
        # The EOS id is appended to every response; a template that writes the EOS text itself would double it.
        stripped = text.rstrip()
        if eos and stripped.endswith(eos):
            text = stripped[: -len(eos)]
        texts.append(text)
    return prompt_text, texts, plain


# ---------------------------------------------------------------------- tokenizing
def tokenize_rows(rows: Sequence[Any], kind: Kind, cfg, tokenizer, file_label: str, skip_bad_rows: bool = False,
                  response_limit: Optional[int] = None) -> tuple[list, SkipReport]:
    """Validate, render and tokenise standard rows for one stage.

    Returns ``(examples, report)``: :class:`~rlhflab.data.tldr.SFTExample` (``kind="sft"``),
    :class:`~rlhflab.data.tldr.PrefExample` (``"preference"``) or :class:`PromptExample`
    (``"prompt"``), in file order, with ``subreddit``/``title`` empty and ``post`` the prompt's
    plain text. ``response_limit``: longest response in tokens with EOS (bad row beyond).
    """
    _check_tokenizer(tokenizer)
    report = SkipReport(file_label)
    report.seen = len(rows)
    template = chat_template(cfg, tokenizer)
    maxq = cfg.data.max_query_length
    rendered = []  # (row index, id, prompt text, response texts, plain)
    for i, row in enumerate(rows):
        try:
            p = parse_row(row, kind, cfg, file_label, i)
            if not isinstance(p.prompt, str) and template is None:
                raise _no_template_error(cfg, file_label, i, column(cfg, "messages" if _present(row, cfg, "messages")
                                                                    and not _present(row, cfg, "prompt") else "prompt"))
            field = column(cfg, "messages" if isinstance(row, dict) and _present(row, cfg, "messages") else
                           ("completion" if kind == "sft" else "chosen"))
            rendered.append((i, p.id, *render(tokenizer, template, p.prompt, p.responses, file_label, i, field)))
        except DataError as e:
            if not skip_bad_rows:
                raise
            report.add(e)
    query_ids = _encode(tokenizer, [r[2] for r in rendered])
    n_resp = {"sft": 1, "preference": 2, "prompt": 0}[kind]
    eos = tokenizer.eos_token_id
    flat = _encode(tokenizer, [t for r in rendered for t in r[3]])
    examples: list = []
    for k, (i, rid, prompt_text, texts, plain) in enumerate(rendered):
        resp_ids = [ids + [eos] for ids in flat[k * n_resp:(k + 1) * n_resp]]
        try:
            if len(query_ids[k]) > maxq:
                raise DataError(file_label, i, column(cfg, "prompt"), f"prompt is {len(query_ids[k])} tokens, more than "
                                f"data.max_query_length={maxq} (standard prompts are not truncated)", R_QUERY_LONG)
            if not query_ids[k]:
                raise DataError(file_label, i, column(cfg, "prompt"), "renders to no tokens", R_EMPTY)
            names = ("completion",) if kind == "sft" else ("chosen", "rejected")
            for name, ids in zip(names, resp_ids):
                if response_limit is not None and len(ids) > response_limit:
                    raise DataError(file_label, i, column(cfg, name), f"{name} is {len(ids)} tokens with EOS, more than "
                                    f"the {response_limit} allowed", R_RESPONSE_LONG)
        except DataError as e:
            if not skip_bad_rows:
                raise
            report.add(e)
            continue
        if kind == "sft":
            examples.append(SFTExample(rid, prompt_text, query_ids[k], texts[0], resp_ids[0], "", "", plain))
        elif kind == "preference":
            examples.append(PrefExample(rid, prompt_text, query_ids[k], texts[0], texts[1], resp_ids[0], resp_ids[1],
                                        "", "", plain))
        else:
            examples.append(PromptExample(rid, prompt_text, query_ids[k], plain))
    return examples, report


def query_ids(tokenizer, example: Any, max_query_length: int) -> list[int]:
    """Re-encode an example's query text with another policy's tokenizer (evaluation)."""
    ids = _encode(tokenizer, [example.query])[0]
    if len(ids) > max_query_length:
        raise DataError("query", None, "prompt", f"prompt is {len(ids)} tokens with this tokenizer, more than "
                        f"data.max_query_length={max_query_length}", R_QUERY_LONG)
    return ids


# ------------------------------------------------------------------- stage entry points
def _source(cfg, kind: Kind) -> str:
    from rlhflab.stages.common import preference_source, sft_source

    if kind == "preference":
        return preference_source(cfg)
    if kind == "prompt" and cfg.data.prompt_dataset:
        return cfg.data.prompt_dataset
    return sft_source(cfg)


def load_standard(cfg, kind: Kind, split: str, tokenizer, skip_bad_rows: Optional[bool] = None,
                  limit: Optional[int] = None) -> tuple[list, SkipReport]:
    """Read and tokenise one split of a standard dataset (``limit``: only the first rows)."""
    skip = cfg.data.skip_bad_rows if skip_bad_rows is None else skip_bad_rows
    source = _source(cfg, kind)
    rows, label = load_split(source, split_name(cfg, split), "preference" if kind == "preference" else "sft",
                             skip_bad_rows=skip)
    if Path(source).expanduser().is_file() and split != "train":
        log.warning("%s: one file serves every split; the '%s' split reads the same rows as 'train' "
                    "(pass a folder with %s.jsonl, or a hub dataset, for a held-out split)", label, split, split_name(cfg, split))
    if limit is not None:
        rows = rows[:limit]
    if kind == "sft":
        response_limit = cfg.data.response_length
    elif kind == "preference":
        response_limit = cfg.data.max_pref_response_length or 2 * cfg.data.response_length
    else:
        response_limit = None
    examples, report = tokenize_rows(rows, kind, cfg, tokenizer, label, skip, response_limit)
    if report.total:
        log.warning("%s", report)
    return examples, report


def load_sft_data(cfg, split: str, tokenizer) -> tuple[list[SFTExample], SkipReport]:
    """SFT examples of ``split`` for any ``data.task`` (TL;DR: Huang's preprocessing)."""
    if cfg.data.task == "standard":
        return load_standard(cfg, "sft", split, tokenizer)
    from rlhflab.stages.common import sft_source

    return load_sft(sft_source(cfg), split, tokenizer, cfg.data.max_query_length,
                    cfg.data.response_length, cfg.data.skip_bad_rows)


def load_preference_data(cfg, split: str, tokenizer) -> tuple[list[PrefExample], SkipReport]:
    """Preference examples of ``split`` for any ``data.task``."""
    if cfg.data.task == "standard":
        return load_standard(cfg, "preference", split, tokenizer)
    from rlhflab.stages.common import preference_source

    return load_preferences(preference_source(cfg), split, tokenizer, cfg.data.max_query_length,
                            cfg.data.response_length, cfg.data.skip_bad_rows, cfg.pref_response_length)


def load_prompt_data(cfg, split: str, tokenizer) -> tuple[list, SkipReport]:
    """PPO prompts: TL;DR SFT examples (Huang trains PPO on the SFT queries), or the prompts
    of a standard dataset (``data.prompt_dataset``, default ``data.sft_dataset``)."""
    if cfg.data.task == "standard":
        return load_standard(cfg, "prompt", split, tokenizer)
    return load_sft_data(cfg, split, tokenizer)


def reference_texts(cfg, tokenizer, n: int) -> tuple[list[str], list[str], str]:
    """(queries, responses, label) the reward bias is computed from, standard task: the first
    ``n`` usable SFT completions, or when the SFT data has none the preferences' chosen responses."""
    try:
        ex, rep = load_standard(cfg, "sft", "train", tokenizer, skip_bad_rows=True, limit=2 * n)
    except DataError:
        ex, rep = [], None
    if not ex:
        pref, rep = load_standard(cfg, "preference", "train", tokenizer, skip_bad_rows=True, limit=2 * n)
        return [e.query for e in pref[:n]], [e.chosen for e in pref[:n]], rep.file
    return [e.query for e in ex[:n]], [e.response for e in ex[:n]], rep.file
