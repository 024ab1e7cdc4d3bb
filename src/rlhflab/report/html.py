"""One self-contained HTML report of a run: curves, evaluation tables, verdicts, samples.

``render_report(run_dir)`` reads only what the stages wrote (``config.yaml``,
``data/stats.json``, ``<stage>/metrics.jsonl`` and ``metrics.json``, ``eval/results.json``,
``eval/samples.jsonl``) and writes ``<run>/report.html``: plots are PNGs drawn with
matplotlib's Agg canvas and embedded as base64 ``data:`` URIs, the CSS is inline, and the
page loads nothing from anywhere (no scripts, fonts or URLs), so it can be mailed or
archived as one file. Every text that comes from data (posts, summaries, config values) is
HTML-escaped.

A partial run renders too: each section says "not run yet" (or "in progress") when its
files are missing, and a plot panel whose metric keys were never logged is replaced by a
note naming them.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import yaml

__all__ = ["render_report", "kl_reading", "hacking_readings", "rm_length_reading"]

# Colours of the policies in every plot (reference in grey).
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
N_SAMPLES = 8  # side-by-side samples shown
MAX_OTHER_PLOTS = 24  # per stage, extra metrics not in a named panel

# (title, keys, note) panels per stage; every listed key that was logged gets a line.
SFT_PANELS = [
    ("Training loss (per target token)", ["train/loss"]),
    ("Validation loss", ["eval/loss"]),
    ("Validation ROUGE-L", ["eval/rougeL"]),
    ("Gold score (tldr-synth)", ["gold/score", "gold/reference", "gold/oracle"]),
]
RM_PANELS = [
    ("Loss (Bradley-Terry)", ["train/loss", "eval/loss"]),
    ("Accuracy", ["train/accuracy", "eval/accuracy", "eval/normalized_accuracy"]),
    ("Reward margin (chosen - rejected)", ["train/margin", "eval/margin"]),
    ("Agreement with the gold judge (tldr-synth)", ["eval/gold_agreement"]),
]
PPO_PANELS = [
    ("RLHF reward (score - beta * KL) and RM score", ["objective/rlhf_reward", "objective/scores", "objective/rm_scores"]),
    ("Gold score (tldr-synth, true objective)", ["gold/score"]),
    ("KL to the SFT policy (nats / sequence)", ["objective/kl"]),
    ("Approximate KL of each update", ["policy/approxkl_token_avg"]),
    ("Rollout entropy (nats / sequence)", ["objective/entropy"]),
    ("Policy entropy (nats / token)", ["policy/entropy_token_avg"]),
    ("Response length (tokens)", ["response/length_mean"]),
    ("Clip fractions", ["policy/clipfrac_avg", "val/clipfrac_avg"]),
    ("Length-score correlation", ["response/length_score_corr"]),
    ("No-EOS rate", ["response/no_eos_rate"]),
]
SIGNAL_LABELS = {
    "hack/title_copy_rate": "title copy",
    "hack/prompt_copy_rate": "prompt copy",
    "hack/repetition_rate": "repetition",
    "hack/no_eos_rate": "no EOS",
    "hack/length_score_corr": "length–RM r",
    "hack/distinct_2": "distinct-2",
}
RATE_SIGNALS = ("hack/title_copy_rate", "hack/prompt_copy_rate", "hack/repetition_rate", "hack/no_eos_rate")

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#1d1d1f;background:#f6f7f9;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:16px 28px 60px}
header{background:#1d2b3a;color:#fff;padding:18px 28px}
header h1{margin:0;font-size:22px} header p{margin:4px 0 0;color:#c9d4df;font-size:13px}
nav{background:#fff;border-bottom:1px solid #dde1e6;padding:8px 28px;font-size:14px;position:sticky;top:0;z-index:2}
nav a{margin-right:16px;color:#1f5fa8;text-decoration:none}
section{background:#fff;border:1px solid #e1e4e8;border-radius:8px;padding:14px 20px;margin:18px 0}
h2{font-size:19px;margin:4px 0 10px} h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{border-bottom:1px solid #e6e8eb;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f3f5f7;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:10px}
.grid img,.wide img{max-width:100%;height:auto;border:1px solid #eef0f2;border-radius:4px}
.note{color:#6a737d;font-size:13px} .missing{color:#8a6d3b;background:#fcf8e3;padding:8px 12px;border-radius:6px}
.verdict{padding:10px 14px;border-radius:6px;margin:8px 0;font-size:14px}
.ok{background:#e6f4ea;border-left:4px solid #34a853}.warn{background:#fef7e0;border-left:4px solid #f9ab00}
.bad{background:#fce8e6;border-left:4px solid #d93025}.info{background:#e8f0fe;border-left:4px solid #4285f4}
ul.readings li{margin:4px 0}
.sample{border:1px solid #e1e4e8;border-radius:6px;padding:10px 12px;margin:12px 0}
.post{white-space:pre-wrap;font-size:12.5px;background:#f8f9fa;padding:8px;border-radius:4px;max-height:180px;overflow:auto}
.summaries{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:8px;margin-top:8px}
.summ{border:1px solid #e6e8eb;border-radius:4px;padding:6px 8px;font-size:13px}
.summ b{display:block;font-size:12px;color:#444} .score{font-size:11.5px;color:#555}
code{background:#f3f5f7;padding:1px 4px;border-radius:3px}
"""


# ---------------------------------------------------------------------------- reading
def _read_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON Lines file; a torn last line (a stage still writing) is ignored."""
    rows = []
    try:
        text = path.read_text()
    except OSError:
        return rows
    for line in text.splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _num(v: Any) -> Optional[float]:
    """A finite float, or None (strings, None, nan, bools)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _dig(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


# ------------------------------------------------------------------------- formatting
def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def fmt(v: Any, digits: int = 3) -> str:
    n = _num(v)
    if n is None:
        return "–" if v is None or isinstance(v, float) else esc(v)
    if n != 0 and (abs(n) >= 1e5 or abs(n) < 10 ** -(digits + 1)):
        return f"{n:.{digits}g}"
    if float(n).is_integer() and abs(n) < 1e5:
        return str(int(n))
    return f"{n:.{digits}f}"


def pct(v: Any) -> str:
    n = _num(v)
    return "–" if n is None else f"{100 * n:.1f}%"


def ci(point: Any, interval: Any, f=fmt) -> str:
    if isinstance(interval, (list, tuple)) and len(interval) == 2 and all(_num(x) is not None for x in interval):
        return f"{f(point)} <span class=note>[{f(interval[0])}, {f(interval[1])}]</span>"
    return f(point)


def table(header: Sequence[str], rows: Iterable[Sequence[str]], num_cols: Sequence[int] = ()) -> str:
    """Cells are trusted HTML (callers escape data with ``esc``/``fmt``)."""
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td class=num>{c}</td>" if i in num_cols else f"<td>{c}</td>" for i, c in enumerate(r)) + "</tr>")
    return "".join(out) + "</table>"


def missing(text: str) -> str:
    return f"<p class=missing>{text}</p>"


# ------------------------------------------------------------------------------ plots
def _figure(width: float = 5.2, height: float = 3.0):
    # Figure() without pyplot: no global state, always the Agg canvas (no display needed).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    return fig, fig.add_subplot(111)


def _png(fig, alt: str) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def _series(rows: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, r in enumerate(rows):
        y = _num(r.get(key))
        if y is not None:
            x = _num(r.get("step"))
            xs.append(x if x is not None else float(i))
            ys.append(y)
    return xs, ys


def line_plot(rows: Sequence[dict], keys: Sequence[str], title: str, hlines: Sequence[tuple[float, str, str]] = ()) -> Optional[str]:
    """A PNG <img> of every key of ``keys`` logged in ``rows`` against ``step``; None if none was."""
    present = [(k, *_series(rows, k)) for k in keys]
    present = [p for p in present if p[1]]
    if not present:
        return None
    fig, ax = _figure()
    for i, (k, xs, ys) in enumerate(present):
        color = PALETTE[i % len(PALETTE)]
        if len(ys) > 40:  # noisy per-step curves: the raw values faint, a moving average on top
            ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
            w = max(len(ys) // 20, 2)
            sm = [sum(ys[max(0, j - w + 1): j + 1]) / len(ys[max(0, j - w + 1): j + 1]) for j in range(len(ys))]
            ax.plot(xs, sm, color=color, label=f"{k} (avg of {w})", linewidth=1.6)
        else:
            ax.plot(xs, ys, color=color, label=k, marker="o" if len(ys) <= 12 else None, markersize=3, linewidth=1.5)
    for y, label, color in hlines:
        ax.axhline(y, color=color, linestyle="--", linewidth=0.9, label=label)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="best")
    return _png(fig, title)


def histogram_plot(hists: dict[str, dict], title: str) -> Optional[str]:
    """Overlaid step histograms ``{name: {"edges": [k+1], "counts": [k]}}`` (shared edges)."""
    hists = {k: v for k, v in hists.items() if isinstance(v, dict) and v.get("edges") and v.get("counts")}
    if not hists:
        return None
    fig, ax = _figure(5.6, 3.0)
    for i, (name, h) in enumerate(hists.items()):
        color = "#7f7f7f" if name == "reference" else PALETTE[i % len(PALETTE)]
        ax.stairs(h["counts"], h["edges"], label=name, color=color, linewidth=1.6, fill=False)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("normalised RM score", fontsize=9)
    ax.set_ylabel("posts", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig, title)


def bar_plot(labels: Sequence[str], values: Sequence[float], title: str, ylabel: str) -> str:
    fig, ax = _figure(5.2, 2.8)
    ax.bar(range(len(values)), values, color=PALETTE[0])
    ax.set_xticks(range(len(values)), [str(x) for x in labels], fontsize=8, rotation=20)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _png(fig, title)


def panels(rows: Sequence[dict], spec: Sequence[tuple[str, list[str]]], extra_hlines: Optional[dict] = None) -> tuple[str, set[str]]:
    """Plot grid for ``spec`` panels; returns (html, keys used). Missing panels become a note."""
    imgs, notes, used = [], [], set()
    for title, keys in spec:
        img = line_plot(rows, keys, title, (extra_hlines or {}).get(title, ()))
        if img is None:
            notes.append(f"{esc(title)} (<code>{esc(', '.join(keys))}</code>)")
        else:
            imgs.append(img)
            used.update(keys)
    out = f"<div class=grid>{''.join(imgs)}</div>" if imgs else ""
    if notes:
        out += f"<p class=note>Not logged in this run: {'; '.join(notes)}.</p>"
    return out, used


def other_metrics(rows: Sequence[dict], used: set[str]) -> str:
    """Small plots of every other numeric key, so nothing a stage logs is hidden."""
    skip = used | {"step", "episode", "epoch"}
    keys = sorted({k for r in rows for k, v in r.items() if k not in skip and _num(v) is not None})
    if not keys:
        return ""
    imgs = [line_plot(rows, [k], k) for k in keys[:MAX_OTHER_PLOTS]]
    more = f" ({len(keys) - MAX_OTHER_PLOTS} more not shown)" if len(keys) > MAX_OTHER_PLOTS else ""
    return (f"<details><summary>Other logged metrics ({len(keys)}){more}</summary>"
            f"<div class=grid>{''.join(i for i in imgs if i)}</div></details>")


def flat(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, leaf value) of a nested dict."""
    out: list[tuple[str, Any]] = []
    for k, v in (d.items() if isinstance(d, dict) else []):
        if isinstance(v, dict):
            out.extend(flat(v, f"{prefix}{k}."))
        else:
            out.append((f"{prefix}{k}", v))
    return out


def metrics_table(d: dict) -> str:
    rows = [(esc(k), fmt(v) if not isinstance(v, list) else esc(json.dumps(v)[:120])) for k, v in flat(d)]
    return table(["metric", "value"], rows, num_cols=[1])


# ------------------------------------------------------------------------- verdicts
def kl_reading(kl: Optional[float], thresholds: dict, logged_verdict: Optional[str] = None) -> tuple[str, str]:
    """(css class, plain-language sentence) for the final KL of PPO.

    Verdicts are those of ``rlhflab.monitor.kl_verdict`` with the run's
    ``ppo.kl_monitor`` thresholds; ``logged_verdict`` (``kl/health`` of ppo/metrics.json)
    wins when given, so the report says what the run itself decided.
    """
    from rlhflab.config import KLMonitorConfig
    from rlhflab.monitor import kl_verdict

    t = KLMonitorConfig(**{k: v for k, v in (thresholds or {}).items() if k in KLMonitorConfig.model_fields})
    if kl is None and not logged_verdict:
        return "info", "No KL was logged."
    verdict = logged_verdict if isinstance(logged_verdict, str) and logged_verdict else kl_verdict(kl, t)
    k = f"{kl:.2f} nats" if kl is not None else "unknown"
    band = (f"(bands: barely changed &lt; {t.barely_changed:g} &le; moderate &lt; {t.healthy_low:g} &le; healthy &le; "
            f"{t.healthy_high:g} &lt; elevated &le; {t.drifting:g} &lt; drifting &le; {t.catastrophic:g} &lt; catastrophic)")
    sentences = {
        "barely changed": ("warn", f"KL {k}: the policy has barely moved from the SFT policy. PPO had little effect so far; "
                                   "train longer or lower ppo.kl_coef."),
        "moderate": ("info", f"KL {k}: the policy has moved a little from the SFT policy, below the healthy band."),
        "healthy": ("ok", f"KL {k}: healthy. The policy moved away from the SFT policy as far as the KL penalty intends, no further."),
        "elevated": ("warn", f"KL {k}: above the healthy band. Watch the gold score and the reward-hacking signals below."),
        "drifting": ("bad", f"KL {k}: drifting. The policy is far from the SFT policy; over-optimisation of the RM is likely. "
                            "Raise ppo.kl_coef or stop earlier."),
        "catastrophic": ("bad", f"KL {k}: catastrophic. The run was stopped at the last good checkpoint; "
                                "raise ppo.kl_coef or lower the learning rate."),
    }
    cls, text = sentences.get(verdict, ("info", f"KL {k}: verdict '{esc(verdict)}'."))
    return cls, f"<b>{esc(verdict)}</b> — {text} <span class=note>{band}</span>"


def _edge_mean(rows: Sequence[dict], key: str, first: bool) -> Optional[float]:
    """Mean of the first (or last) k logged values of ``key``, k = len/3 clamped to 1..3: a less
    noisy start/end that never lets the start and end windows overlap. None if < 2 values."""
    _, ys = _series(rows, key)
    if len(ys) < 2:
        return None
    k = min(3, max(1, len(ys) // 3))
    part = ys[:k] if first else ys[-k:]
    return sum(part) / len(part)


def _edge_noise(rows: Sequence[dict], key: str) -> Optional[float]:
    """Standard error of ``_edge_mean(last) - _edge_mean(first)`` from the per-row standard errors
    logged beside ``key`` (``<key>_se``: each rollout's gold score is a mean over one batch of
    random prompts); None when they were not logged."""
    se_rows = [r for r in rows if r.get(key) is not None and r.get(key + "_se") is not None]
    if len(se_rows) < 2 or len(se_rows) != len([r for r in rows if r.get(key) is not None]):
        return None
    ses = [float(r[key + "_se"]) for r in se_rows]
    if any(not math.isfinite(x) for x in ses):
        return None
    k = min(3, max(1, len(ses) // 3))
    first, last = ses[:k], ses[-k:]
    return math.sqrt(sum(x * x for x in first) / k ** 2 + sum(x * x for x in last) / k ** 2)


def hacking_readings(ppo_rows: Sequence[dict], results: Optional[dict]) -> list[tuple[str, str]]:
    """Plain-language readings ``(css class, sentence)`` of the reward-hacking evidence.

    From PPO training: RM score vs gold score trend (over-optimisation when the proxy rises
    while the true objective falls), response length growth, the length-score correlation.
    From evaluation: every signal of the PPO policy next to the SFT policy's.
    """
    out: list[tuple[str, str]] = []
    # objective/rm_scores: the RM's own score; objective/scores may include the missing-EOS penalty (Huang detail)
    rm_key = "objective/rm_scores" if _series(ppo_rows, "objective/rm_scores")[1] else "objective/scores"
    rm0, rm1 = _edge_mean(ppo_rows, rm_key, True), _edge_mean(ppo_rows, rm_key, False)
    g0, g1 = _edge_mean(ppo_rows, "gold/score", True), _edge_mean(ppo_rows, "gold/score", False)
    noise = _edge_noise(ppo_rows, "gold/score")
    if rm0 is not None and rm1 is not None:
        d_rm = rm1 - rm0
        if g0 is not None and g1 is not None:
            d_g = g1 - g0
            if noise is not None and abs(d_g) <= 2 * noise:
                out.append(("info", f"During PPO the RM score changed by {d_rm:+.3f}; the rollouts' gold score changed by "
                                    f"{d_g:+.3f}, within sampling noise (2 standard errors: ±{2 * noise:.3f}) — the "
                                    "evaluation below, on fixed posts, is the measurement to read."))
            elif d_rm > 0 and d_g < 0:
                out.append(("bad", f"During PPO the RM score rose by {d_rm:.3f} while the gold score fell by {-d_g:.3f}: "
                                   "over-optimisation — the policy is exploiting the reward model, not improving."))
            elif d_rm > 0 and d_g >= 0:
                out.append(("ok", f"During PPO the RM score rose by {d_rm:.3f} and the gold score by {d_g:.3f}: "
                                  "the reward model still tracks the true objective."))
            else:
                out.append(("info", f"During PPO the RM score changed by {d_rm:+.3f} and the gold score by {d_g:+.3f}: "
                                    "PPO has not raised the proxy reward."))
        else:
            out.append(("info", f"During PPO the RM score changed by {d_rm:+.3f} (no gold score logged to check it against)."))
    l0, l1 = _edge_mean(ppo_rows, "response/length_mean", True), _edge_mean(ppo_rows, "response/length_mean", False)
    if l0 is not None and l1 is not None and l0 > 0:
        change = (l1 - l0) / l0
        cls = "warn" if change > 0.25 else "info"
        out.append((cls, f"Responses went from {l0:.1f} to {l1:.1f} tokens during PPO ({100 * change:+.0f}%)"
                         + (": the policy writes longer, a known way to please a length-biased RM." if change > 0.25 else ".")))
    _, corrs = _series(ppo_rows, "response/length_score_corr")
    corr = sum(corrs[-3:]) / len(corrs[-3:]) if corrs else None
    if corr is not None:
        out.append(("warn" if corr > 0.3 else "info",
                    f"Longer responses get {'higher' if corr > 0 else 'lower'} RM scores during PPO (r={corr:.2f})"
                    + (": the RM rewards length." if corr > 0.3 else ".")))

    sig = (results or {}).get("signals") or {}
    pol = (results or {}).get("policies") or {}
    if "ppo" in sig:
        base_name = "sft" if "sft" in sig else ("reference" if "reference" in sig else None)
        p, b = sig["ppo"], sig.get(base_name, {}) if base_name else {}
        for key, what in (("hack/title_copy_rate", "title-copy rate"), ("hack/prompt_copy_rate", "prompt-copy rate"),
                          ("hack/repetition_rate", "repetition rate"), ("hack/no_eos_rate", "no-EOS rate")):
            vp, vb = _num(p.get(key)), _num(b.get(key))
            if vp is None:
                continue
            if vb is None:
                out.append(("info", f"PPO {what} {pct(vp)}."))
                continue
            worse = vp - vb > 0.05
            out.append(("warn" if worse else "ok",
                        f"PPO {what} {pct(vp)} vs {pct(vb)} for {esc(base_name).upper() if base_name == 'sft' else esc(base_name)}"
                        + (": the PPO policy does this more often." if worse else ".")))
        r = _num(p.get("hack/length_score_corr"))
        if r is not None:
            out.append(("warn" if r > 0.3 else "info",
                        f"On evaluation posts, longer PPO summaries get {'higher' if r > 0 else 'lower'} RM scores (r={r:.2f})"
                        + (": length bias of the RM." if r > 0.3 else ".")))
    if "ppo" in pol and "sft" in pol:
        hp, hs = _num(pol["ppo"].get("gold_hallucination_rate")), _num(pol["sft"].get("gold_hallucination_rate"))
        if hp is not None and hs is not None:
            worse = hp - hs > 0.05
            out.append(("warn" if worse else "ok",
                        f"PPO summaries with an invented fact or number (gold judge) {pct(hp)} vs {pct(hs)} for SFT"
                        + (": the RM pays for content it does not check against the post "
                           "(see the RM's faithful-pair preference)." if worse else ".")))
        rp, rs = _num(pol["ppo"].get("rm_score_mean")), _num(pol["sft"].get("rm_score_mean"))
        gp, gs = _num(pol["ppo"].get("gold_mean")), _num(pol["sft"].get("gold_mean"))
        if None not in (rp, rs, gp, gs):
            if rp > rs and gp < gs:
                out.append(("bad", f"On evaluation posts PPO beats SFT on the RM ({rp:.3f} vs {rs:.3f}) but loses on gold "
                                   f"({gp:.3f} vs {gs:.3f}): over-optimisation."))
            elif rp > rs and gp >= gs:
                out.append(("ok", f"On evaluation posts PPO beats SFT on the RM ({rp:.3f} vs {rs:.3f}) and on gold "
                                  f"({gp:.3f} vs {gs:.3f})."))
    return out


# ------------------------------------------------------------------------- sections
def _stage_status(run: Path, stage: str) -> str:
    d = run / stage
    if (d / "metrics.json").exists():
        return "finished"
    if (d / "metrics.jsonl").exists() or (d / "state").exists():
        return "in progress or interrupted"
    return "not run yet"


def _not_run(stage: str, status: str, command: str) -> str:
    if status == "not run yet":
        return missing(f"{stage} has not run yet: <code>{esc(command)}</code>")
    return missing(f"{stage} is {esc(status)}: no final metrics.json yet; curves below show what was logged so far.")


def section_overview(run: Path, cfg: dict, stats: Optional[dict], summary: Optional[dict]) -> str:
    statuses = [(s, _stage_status(run, s)) for s in ("sft", "rm", "ppo", "eval")]
    out = ["<h2 id=overview>Run overview</h2>",
           table(["stage", "status"], [(esc(s), esc(st)) for s, st in statuses])]
    highlights = [
        ("data.task", _dig(cfg, "data", "task")), ("model.policy", _dig(cfg, "model", "policy") or "random Llama (model.arch)"),
        ("model.arch", ", ".join(f"{k}={v}" for k, v in (_dig(cfg, "model", "arch") or {}).items())),
        ("model.reward_backbone", _dig(cfg, "model", "reward_backbone")), ("model.critic", _dig(cfg, "model", "critic")),
        ("data.max_query_length / response_length", f"{_dig(cfg, 'data', 'max_query_length')} / {_dig(cfg, 'data', 'response_length')}"),
        ("sft: epochs, batch, lr", f"{_dig(cfg, 'sft', 'epochs')}, {_dig(cfg, 'sft', 'batch_size')}, {_dig(cfg, 'sft', 'optim', 'lr')}"),
        ("rm: epochs, batch, lr", f"{_dig(cfg, 'rm', 'epochs')}, {_dig(cfg, 'rm', 'batch_size')}, {_dig(cfg, 'rm', 'optim', 'lr')}"),
        ("ppo: episodes, batch, epochs, lr", f"{_dig(cfg, 'ppo', 'total_episodes')}, {_dig(cfg, 'ppo', 'batch_size')}, "
                                              f"{_dig(cfg, 'ppo', 'ppo_epochs')}, {_dig(cfg, 'ppo', 'optim', 'lr')}"),
        ("ppo: kl_coef, temperature, gamma, lam", f"{_dig(cfg, 'ppo', 'kl_coef')}, {_dig(cfg, 'ppo', 'temperature')}, "
                                                   f"{_dig(cfg, 'ppo', 'gamma')}, {_dig(cfg, 'ppo', 'lam')}"),
        ("eval: split, posts, temperature", f"{_dig(cfg, 'eval', 'split')}, {_dig(cfg, 'eval', 'n_prompts')}, {_dig(cfg, 'eval', 'temperature')}"),
    ]
    if cfg:
        out.append("<h3>Configuration highlights</h3>")
        out.append(table(["key", "value"], [(esc(k), esc(v)) for k, v in highlights]))
        out.append(f"<details><summary>Full resolved config</summary><pre>{esc(yaml.safe_dump(cfg, sort_keys=False))}</pre></details>")
    else:
        out.append(missing("No config.yaml in the run directory."))
    if stats:
        out.append("<h3>Data (tldr-synth stats.json)</h3>")
        key_rows = []
        for label, path in (("gold mean of the reference summaries", ("gold_mean", "reference")),
                            ("gold mean of the oracle summaries (best possible)", ("gold_mean", "oracle")),
                            ("Bayes accuracy (best possible RM accuracy on the labels)", ("bayes_accuracy",))):
            v = _dig(stats, *path)
            if v is not None:
                key_rows.append((esc(label), fmt(v)))
        if key_rows:
            out.append(table(["quantity", "value"], key_rows, num_cols=[1]))
        out.append(f"<details><summary>All data statistics</summary>{metrics_table(stats)}</details>")
    if summary:
        out.append(f"<details><summary>summary.json (headline numbers)</summary>{metrics_table(summary)}</details>")
    return "".join(out)


def section_sft(run: Path) -> str:
    status = _stage_status(run, "sft")
    rows, final = _read_jsonl(run / "sft" / "metrics.jsonl"), _read_json(run / "sft" / "metrics.json")
    out = ["<h2 id=sft>Supervised fine-tuning</h2>"]
    if status != "finished":
        out.append(_not_run("SFT", status, "rlhflab sft --config <config>"))
    if rows:
        plots, used = panels(rows, SFT_PANELS)
        out += [plots, other_metrics(rows, used)]
    if isinstance(final, dict):
        out.append(f"<h3>Final metrics</h3>{metrics_table(final)}")
    return "".join(out)


def _bucket_plot(final: dict) -> str:
    """RM accuracy per |length difference| bucket: ``eval/accuracy_lendiff_<bucket>`` (+ ``..._n``) of rm/metrics.json."""
    pre = "eval/accuracy_lendiff_"
    buckets = [(k[len(pre):], _num(v), final.get(k + "_n")) for k, v in final.items()
               if k.startswith(pre) and not k.endswith("_n") and _num(v) is not None]
    if not buckets:
        return ""
    labels = [f"{b} words" + (f" (n={n})" if isinstance(n, int) else "") for b, _, n in buckets]
    return f"<div class=grid>{bar_plot(labels, [v for _, v, _ in buckets], 'Accuracy by |length difference| of the pair', 'accuracy')}</div>"


RM_KEYS = [
    ("eval/accuracy", "validation accuracy"),
    ("data/bayes_accuracy", "Bayes accuracy of the noisy labels (ceiling)"),
    ("eval/normalized_accuracy", "normalised accuracy (acc - 0.5) / (Bayes - 0.5)"),
    ("eval/normalized_accuracy_se", "its standard error from the sampled labels"),
    ("eval/expected_normalized_accuracy", "the same without label-sampling noise (expected accuracy vs the labelers' probabilities)"),
    ("eval/gold_agreement", "agreement with the gold judge"),
    ("rm/length_covariate_w", "rm.length_covariate: learned length term w per word (absorbed in training, not in the reward)"),
    ("eval/length_term/accuracy", "accuracy of r + w*length, the model fit to the labels"),
    ("eval/length_term/normalized_accuracy", "its normalised accuracy"),
    ("eval/length_term/normalized_accuracy_se", "its standard error from the sampled labels"),
    ("eval/length_term/expected_normalized_accuracy", "its normalised accuracy without label-sampling noise"),
    ("eval/margin", "mean margin r(chosen) - r(rejected)"),
    ("eval/length_coef", "learned length bias (score per word of length difference)"),
    ("data/labeler_length_coef", "the labelers' length bias beta_len"),
    ("eval/gold_coef", "learned gold coefficient"),
    ("data/labeler_gold_coef", "the labelers' gold coefficient 1/tau"),
    ("eval/prefers_longer_near_tie", "near-equal-gold pairs: RM prefers the longer"),
    ("data/labels_prefer_longer_near_tie", "near-equal-gold pairs: labels prefer the longer"),
    ("eval/faithful/rm_prefers_faithful", "pairs where one summary invents a fact: RM prefers the faithful one"),
    ("eval/faithful/labels_prefer_faithful", "the same pairs: labels prefer the faithful one"),
    ("eval/faithful/ask/rm_prefers_faithful", "pairs where one summary invents the ask: RM prefers the faithful one"),
    ("eval/faithful/ask/labels_prefer_faithful", "the same pairs: labels prefer the faithful one"),
    ("eval/on_policy/gold_agreement", "the SFT policy's own samples: pairs the RM orders as the gold judge does"),
    ("eval/on_policy/within_post_corr", "the same samples: RM-gold correlation within posts"),
    ("eval/on_policy/best_of_n_gold_gain", "the same samples: gold gained by best-of-n on the RM (n = samples per post)"),
]

# The on-policy agreement under which PPO's gain was weak on tldr-synth: of seven RMs trained on the
# writers' pairs (benchmarks/RESULTS.md, issue 11), those at 0.635 / 0.661 / 0.691 gave PPO wins of
# 0.53 / 0.72 / 0.69 against SFT, those at 0.718-0.759 0.77-0.89. Not sufficient: an RM trained on
# SFT-sample pairs (rm.sft_pairs) reached 0.753 and its PPO won 0.62.
ON_POLICY_WEAK = 0.70


def rm_faithful_reading(final: dict) -> Optional[tuple[str, str]]:
    """(css class, sentence): does the RM prefer faithful summaries as the labels do (tldr-synth)?"""
    rm_f, lab_f = _num(final.get("eval/faithful/rm_prefers_faithful")), _num(final.get("eval/faithful/labels_prefer_faithful"))
    if rm_f is None or lab_f is None:
        return None
    n = final.get("eval/faithful/pairs")
    s = (f"On the {esc(n)} validation pairs where one summary states a fact or number the post does not, the RM prefers "
         f"the faithful one {pct(rm_f)} of the time (labels: {pct(lab_f)}).")
    blind = rm_f < lab_f - 0.1
    return ("warn" if blind else "ok"), s + (
        " It does not check content against the post: PPO can raise its score by inventing facts (an ask, a number); "
        "the evaluation's invented-facts column shows whether it did." if blind else "")


def rm_on_policy_reading(final: dict) -> Optional[tuple[str, str]]:
    """(css class, sentence): does the RM rank the SFT policy's own samples as the gold judge does?"""
    agree = _num(final.get("eval/on_policy/gold_agreement"))
    if agree is None:
        return None
    s = (f"On {esc(final.get('eval/on_policy/pairs'))} pairs of the SFT policy's own samples (what PPO starts from) the RM "
         f"orders {pct(agree)} as the gold judge does.")
    weak = agree < ON_POLICY_WEAK
    return ("warn" if weak else "ok"), s + (
        f" Below {pct(ON_POLICY_WEAK)}: on tldr-synth, RMs trained on the writers' pairs that scored this low gave PPO a weak "
        "gold gain (win rates 0.53-0.72 against SFT, against 0.77-0.89 above it; benchmarks/RESULTS.md)." if weak else
        " A warning sign when low, not a guarantee when high: PPO leaves the SFT policy's distribution, and an RM trained on "
        "SFT samples scored 0.75 here yet let PPO invent facts (benchmarks/RESULTS.md).")


def rm_length_reading(final: dict) -> Optional[tuple[str, str]]:
    """(css class, sentence) comparing the RM's learned length bias with the labelers' (tldr-synth)."""
    rm_len, lab_len = _num(final.get("eval/length_coef")), _num(final.get("data/labeler_length_coef"))
    near, near_lab = _num(final.get("eval/prefers_longer_near_tie")), _num(final.get("data/labels_prefer_longer_near_tie"))
    parts = []
    w = _num(final.get("rm/length_covariate_w"))
    if w is not None:
        parts.append(f"The RM was fit with a length term (rm.length_covariate): it took up {w:.3f} per word of the "
                     "labels' length preference, and the reward PPO reads leaves that term out.")
    if rm_len is not None:
        s = f"The RM's score rises by {rm_len:.3f} per extra word at equal gold quality"
        if lab_len is not None:
            s += f" (the simulated labelers' length bias is {lab_len:.3f} per word)"
        parts.append(s + ".")
    if near is not None:
        parts.append(f"Between summaries of near-equal gold quality it prefers the longer one {pct(near)} of the time"
                     + (f" (labels: {pct(near_lab)})" if near_lab is not None else "") + ".")
    if not parts:
        return None
    biased = (rm_len is not None and rm_len > 0) or (near is not None and near > 0.55)
    return ("warn" if biased else "ok"), " ".join(parts) + (
        " It has learned a length bias: PPO can raise its score by writing longer." if biased else " No length bias is visible.")


def section_rm(run: Path) -> str:
    status = _stage_status(run, "rm")
    rows, final = _read_jsonl(run / "rm" / "metrics.jsonl"), _read_json(run / "rm" / "metrics.json")
    out = ["<h2 id=rm>Reward model</h2>"]
    if status != "finished":
        out.append(_not_run("RM training", status, "rlhflab rm --config <config>"))
    if rows:
        plots, used = panels(rows, RM_PANELS)
        out += [plots, other_metrics(rows, used)]
    if isinstance(final, dict):
        key_rows = [(esc(label), f"<code>{esc(k)}</code>", fmt(final[k])) for k, label in RM_KEYS if _num(final.get(k)) is not None]
        if key_rows:
            out.append("<h3>Accuracy and length bias</h3>" + table(["quantity", "key", "value"], key_rows, num_cols=[2]))
        for reading in (rm_length_reading(final), rm_faithful_reading(final), rm_on_policy_reading(final)):
            if reading:
                out.append(f"<div class='verdict {reading[0]}'>{reading[1]}</div>")
        out.append(_bucket_plot(final))
        out.append(f"<details><summary>All final metrics</summary>{metrics_table(final)}</details>")
    return "".join(out)


def section_ppo(run: Path, cfg: dict) -> tuple[str, list[dict]]:
    status = _stage_status(run, "ppo")
    rows, final = _read_jsonl(run / "ppo" / "metrics.jsonl"), _read_json(run / "ppo" / "metrics.json")
    out = ["<h2 id=ppo>PPO</h2>"]
    if status != "finished":
        out.append(_not_run("PPO", status, "rlhflab ppo --config <config>"))
    thresholds = _dig(cfg, "ppo", "kl_monitor") or {}
    if rows or isinstance(final, dict):
        kl = _num((final or {}).get("objective/kl")) if isinstance(final, dict) else None
        if kl is None:
            _, ys = _series(rows, "objective/kl")
            kl = ys[-1] if ys else None
        logged = (final or {}).get("kl/health") if isinstance(final, dict) else None
        if not isinstance(logged, str):
            last = next((r.get("kl/health") for r in reversed(rows) if isinstance(r.get("kl/health"), str)), None)
            logged = last
        cls, text = kl_reading(kl, thresholds, logged)
        out.append(f"<h3>KL health</h3><div class='verdict {cls}'>{text}</div>")
    if rows:
        from rlhflab.config import KLMonitorConfig

        t = KLMonitorConfig(**{k: v for k, v in thresholds.items() if k in KLMonitorConfig.model_fields})
        hl = {"KL to the SFT policy (nats / sequence)": [(t.healthy_low, "healthy band", "#34a853"),
                                                          (t.healthy_high, "", "#34a853"),
                                                          (t.drifting, "drifting", "#f9ab00")]}
        plots, used = panels(rows, PPO_PANELS, hl)
        out += [plots, other_metrics(rows, used)]
    if isinstance(final, dict):
        out.append(f"<details><summary>Final metrics</summary>{metrics_table(final)}</details>")
    return "".join(out), rows


def section_eval(run: Path, results: Optional[dict]) -> str:
    out = ["<h2 id=eval>Evaluation</h2>"]
    if not isinstance(results, dict) or not results.get("policies"):
        status = "in progress or interrupted" if (run / "eval").exists() else "not run yet"
        out.append(_not_run("Evaluation", status, "rlhflab eval --config <config>"))
        return "".join(out)
    meta = results.get("meta") or {}
    pol = results["policies"]
    ref = results.get("reference") or {}
    out.append(f"<p class=note>{esc(meta.get('n_prompts', '?'))} posts of the {esc(meta.get('split', '?'))} split, "
               f"temperature {esc(meta.get('temperature', '?'))}, judges: {esc(', '.join(meta.get('judges') or []))}. "
               f"95% intervals are percentile bootstraps ({esc(meta.get('bootstrap', '?'))} resamples) over posts.</p>")

    rows = []
    for name, d in list(pol.items()) + ([("reference", ref)] if ref else []):
        lt, lw = d.get("length_tokens") or {}, d.get("length_words") or {}
        rows.append((f"<b>{esc(name)}</b>" if name != "reference" else "<i>reference (noisy writer)</i>",
                     ci(d.get("gold_mean"), d.get("gold_ci")), ci(d.get("rm_score_mean"), d.get("rm_score_ci")),
                     ci(d.get("rougeL"), d.get("rougeL_ci")) if name != "reference" else "–",
                     fmt(d.get("entropy")), fmt(lt.get("mean"), 1), fmt(lw.get("mean"), 1), pct(d.get("no_eos_rate")),
                     fmt(d.get("gold_coverage_mean")), pct(d.get("gold_hallucination_rate"))))
    out.append("<h3>Policies</h3>" + table(
        ["policy", "gold score [95% CI]", "RM score [95% CI]", "ROUGE-L", "entropy (nats)", "tokens", "words", "no EOS",
         "key-fact coverage", "invented facts"],
        rows, num_cols=[1, 2, 3, 4, 5, 6, 7, 8, 9]))
    if meta.get("entropy_definition"):
        out.append(f"<p class=note>Entropy: {esc(meta['entropy_definition'])}.</p>")

    comps = results.get("comparisons") or []
    if comps:
        crow = [(esc(c.get("judge")), f"<b>{esc(c.get('a'))}</b> vs {esc(c.get('b'))}", ci(c.get("win_rate"), c.get("ci"), pct),
                 ci(c.get("lc_win_rate"), c.get("lc_ci"), pct), f"{c.get('wins', '–')}/{c.get('losses', '–')}/{c.get('ties', '–')}",
                 esc(c.get("n"))) for c in comps]
        out.append("<h3>Win rates</h3>" + table(["judge", "comparison", "win rate [95% CI]", "length-controlled", "W/L/T", "n"],
                                                crow, num_cols=[2, 3, 5]))
        out.append(f"<p class=note>Ties count as half a win. Length control: {esc(meta.get('lc_method', 'see results.json'))}. "
                   "The 'rm' judge is the reward model itself, a proxy; 'gold' is the known-answer judge of tldr-synth.</p>")
    else:
        out.append(missing("No pairwise comparisons (no gold judge, RM or LLM judge was available)."))
    agree = results.get("judges_agreement")
    if isinstance(agree, dict) and agree:
        arow = [(esc(k), pct(v.get("judge/agreement")), fmt(v.get("judge/kappa")), fmt(v.get("judge/n_compared")))
                for k, v in agree.items() if isinstance(v, dict)]
        out.append("<h3>Gold vs LLM judge agreement</h3>" + table(["comparison", "agreement", "Cohen's kappa", "n (no ties)"], arow, [1, 2, 3]))

    hists = {name: d.get("rm_histogram") for name, d in list(pol.items()) + [("reference", ref)]}
    img = histogram_plot(hists, "Distribution of RM scores on evaluation posts")
    if img:
        out.append(f"<h3>RM score distribution</h3><div class=wide>{img}</div>")

    sig = results.get("signals") or {}
    if sig:
        keys = [k for k in SIGNAL_LABELS if any(k in s for s in sig.values())]
        srow = [(esc(name), *[(pct(s.get(k)) if k in RATE_SIGNALS else fmt(s.get(k))) for k in keys]) for name, s in sig.items()]
        out.append("<h3>Reward-hacking signals</h3>" + table(["policy"] + [SIGNAL_LABELS[k] for k in keys], srow,
                                                            num_cols=list(range(1, len(keys) + 1))))
        out.append(f"<p class=note>Title copy: the summary holds at least {pct(meta.get('title_copy_threshold', 0.7))} of the "
                   "title's words in order (LCS). Prompt copy: a long verbatim word run of the post. Repetition: a repeated "
                   "word 3-gram. length–RM r: Pearson correlation of summary length (words) and RM score.</p>")
    return "".join(out)


def section_hacking(ppo_rows: list[dict], results: Optional[dict]) -> str:
    readings = hacking_readings(ppo_rows, results)
    out = ["<h2 id=hacking>Reward hacking: a plain reading</h2>"]
    if not readings:
        out.append(missing("Nothing to read yet: needs PPO metrics and/or evaluation results."))
    else:
        out.append("".join(f"<div class='verdict {cls}'>{text}</div>" for cls, text in readings))
    return "".join(out)


def section_samples(samples: list[dict], n: int = N_SAMPLES) -> str:
    out = ["<h2 id=samples>Samples</h2>"]
    if not samples:
        out.append(missing("No evaluation samples yet (eval/samples.jsonl)."))
        return "".join(out)
    out.append(f"<p class=note>The first {min(n, len(samples))} of {len(samples)} evaluation posts; "
               "gold = known-answer judge, RM = normalised reward-model score.</p>")
    for s in samples[:n]:
        cards = [("reference", s.get("reference", ""), s.get("reference_gold"), s.get("reference_rm"), None)]
        for name, p in (s.get("policies") or {}).items():
            cards.append((name, p.get("summary", ""), p.get("gold"), p.get("rm"), p.get("has_eos")))
        summ = "".join(
            f"<div class=summ><b>{esc(name)}</b>{esc(text)}<div class=score>gold {fmt(g)} · RM {fmt(r)}"
            + ("" if eos is None or eos else " · <i>no EOS</i>") + "</div></div>"
            for name, text, g, r, eos in cards)
        out.append(f"<div class=sample><div><b>{esc(s.get('title', ''))}</b> <span class=note>r/{esc(s.get('subreddit', ''))} · "
                   f"{esc(s.get('id', ''))}</span></div><div class=post>{esc(s.get('post', ''))}</div>"
                   f"<div class=summaries>{summ}</div></div>")
    return "".join(out)


# ------------------------------------------------------------------------------ main
def _data_dir(run: Path, cfg: dict) -> Path:
    d = _dig(cfg, "data", "dir")
    if d:
        return Path(d)
    # `rlhflab run --seeds N` keeps one dataset next to the seed-<i>/ folders
    return run.parent / "data" if run.name.startswith("seed-") and not (run / "data").exists() else run / "data"


def render_report(run_dir: str | Path, out: Optional[str | Path] = None) -> Path:
    """Write the self-contained HTML report of ``run_dir``; returns its path (default ``<run>/report.html``).

    Raises:
        FileNotFoundError: ``run_dir`` is not a directory.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory not found: {run}")
    cfg = {}
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    cfg = cfg if isinstance(cfg, dict) else {}
    stats = _read_json(_data_dir(run, cfg) / "stats.json")
    summary = _read_json(run / "summary.json")
    results = _read_json(run / "eval" / "results.json")
    samples = _read_jsonl(run / "eval" / "samples.jsonl")

    from rlhflab.report.overopt import section_overopt  # its own module: Gao et al.'s curves and fits

    ppo_html, ppo_rows = section_ppo(run, cfg)
    body = [
        section_overview(run, cfg, stats if isinstance(stats, dict) else None, summary if isinstance(summary, dict) else None),
        section_sft(run), section_rm(run), ppo_html, section_eval(run, results if isinstance(results, dict) else None),
        section_hacking(ppo_rows, results if isinstance(results, dict) else None), section_overopt(run), section_samples(samples),
    ]
    name = cfg.get("name") or run.name
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in (("overview", "Overview"), ("sft", "SFT"), ("rm", "Reward model"),
                                                         ("ppo", "PPO"), ("eval", "Evaluation"), ("hacking", "Reward hacking"),
                                                         ("overopt", "Over-optimisation"), ("samples", "Samples")))
    page = (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width, initial-scale=1'>"
        f"<title>rlhflab report: {esc(name)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>rlhflab report: {esc(name)}</h1><p>{esc(run.resolve())} · generated "
        f"{esc(time.strftime('%Y-%m-%d %H:%M:%S'))}</p></header><nav>{nav}</nav><main>"
        + "".join(f"<section>{b}</section>" for b in body)
        + "</main></body></html>"
    )
    dest = Path(out) if out else run / "report.html"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(dest)
    return dest
