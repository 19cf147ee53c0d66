"""Diff
====

``lit-probe diff RUN_A RUN_B`` and :func:`diff_runs`: did a change alter training, and where did it first differ?

Two runs' records (``run.json`` and the per-step statistics of ``stats.bin``, :mod:`lit_probe.statlog`) are
aligned by stream (module call and signal), statistic and step. For each signal (activation, gradient,
parameter) the diff names the first step where any statistic of any stream differs beyond the tolerance
(exact by default: the same float32 value, NaN matching NaN; ``rtol``/``atol`` for runs that are not
bit-identical), and at that step the first stream in execution order (activations in forward order, gradients
in backward order, parameters in the order their modules ran); then how the difference spread: which streams
differ, from which step. Streams present in one run only (a renamed or added layer) and steps present in one
run only (runs of different lengths, a crashed run) are listed, never silently skipped; steps a run began and
never finished (it failed inside them) are not compared.

Views: :meth:`RunDiff.to_text` (the terminal: a verdict, a table per signal, a streams x steps map) and
:meth:`RunDiff.to_html` / :func:`write_diff_html` (one self-contained page with the divergence figure, streams x
steps, the first difference of each signal marked). Nothing here imports torch or Lightning; matplotlib only
for the figure.
"""

from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .record import RECORD_NAME, RunRecord, read_record
from .sinks import atomic_write_text
from .statlog import STATS_NAME, StatLog, read_stats
from .vocab import ACTIVATION, GRADIENT, PARAMETER, SIGNALS

__all__ = ["diff_runs", "RunDiff", "SignalDiff", "FirstDifference", "write_diff_html", "find_save_dir",
           "DIFF_NAME"]

#: The default file name of the diff page.
DIFF_NAME = "diff.html"
_MAX_FIGURE_COLUMNS = 600


def find_save_dir(path: str | os.PathLike[str]) -> Path:
    """The save directory of a run: ``path`` itself, or its ``probe/`` (a demo's ``--out``, a trainer's
    ``default_root_dir``).

    Raises:
        FileNotFoundError: neither holds a statistics log.
    """
    p = Path(path)
    for cand in (p, p / "probe"):
        if (cand / STATS_NAME).is_file():
            return cand
    if (p / RECORD_NAME).is_file() or (p / "probe" / RECORD_NAME).is_file():
        raise FileNotFoundError(f"{p}: the run kept no per-step statistics ({STATS_NAME}): it ran with "
                                "stats_file_mb=0 or a lit-probe without them")
    raise FileNotFoundError(f"{p}: not the save directory of a lit-probe run (no {STATS_NAME} or {RECORD_NAME})")


@dataclass
class FirstDifference:
    """Where a signal's two runs first part: ``step``, ``stream`` (first in execution order at that step), the
    ``stats`` that differ there and their values in each run; ``streams``: how many streams differ at that step."""

    signal: str
    step: int
    stream: str
    stats: list[str]
    a: list[float]
    b: list[float]
    streams: int

    def describe(self) -> str:
        vals = ", ".join(f"{s} {_num(x)} vs {_num(y)}" for s, x, y in zip(self.stats[:3], self.a, self.b))
        more = f" (+{len(self.stats) - 3} more statistics)" if len(self.stats) > 3 else ""
        return f"step {self.step}, {self.signal} of `{self.stream}`: {vals}{more}"


@dataclass
class SignalDiff:
    """One signal: ``streams`` (compared, in execution order) x ``steps`` (common), ``differs`` (bool) and
    ``magnitude`` (the largest relative difference over the statistics, 0 where equal)."""

    signal: str
    streams: list[str]
    steps: np.ndarray
    differs: np.ndarray
    magnitude: np.ndarray
    first: Optional[FirstDifference] = None

    def first_steps(self) -> dict[str, int]:
        """Per differing stream, its first differing step."""
        out = {}
        for k, name in enumerate(self.streams):
            hit = np.flatnonzero(self.differs[k])
            if hit.size:
                out[name] = int(self.steps[hit[0]])
        return out

    def spread(self) -> list[tuple[int, int]]:
        """``(step, streams differing at or before it)`` at each step where that count grows."""
        firsts = sorted(self.first_steps().values())
        out: list[tuple[int, int]] = []
        for n, st in enumerate(firsts, 1):
            if out and out[-1][0] == st:
                out[-1] = (st, n)
            else:
                out.append((st, n))
        return out


@dataclass
class RunDiff:
    """Two runs compared (:func:`diff_runs`)."""

    a: str
    b: str
    rtol: float
    atol: float
    status: tuple[str, str]
    steps_a: np.ndarray
    steps_b: np.ndarray
    steps: np.ndarray
    signals: dict[str, SignalDiff]
    only_in_a: list[tuple[str, str]] = field(default_factory=list)  # (signal, stream)
    only_in_b: list[tuple[str, str]] = field(default_factory=list)
    stats_only: list[str] = field(default_factory=list)
    partial: tuple[list[int], list[int]] = ([], [])
    torn: tuple[bool, bool] = (False, False)
    notes: list[str] = field(default_factory=list)

    @property
    def first(self) -> Optional[FirstDifference]:
        """The earliest first difference over the signals (at one step: activation, then gradient, then
        parameter: the order they are measured in a step)."""
        firsts = [d.first for d in self.signals.values() if d.first is not None]
        return min(firsts, key=lambda f: (f.step, SIGNALS.index(f.signal))) if firsts else None

    @property
    def differs(self) -> bool:
        """A statistic differs at a step both runs have."""
        return self.first is not None

    @property
    def identical(self) -> bool:
        """No statistic differs, the same streams, the same steps."""
        return not self.differs and not self.only_in_a and not self.only_in_b and \
            np.array_equal(self.steps_a, self.steps_b)

    # ------------------------------------------------------------------ views
    def verdict(self) -> str:
        tol = "exactly" if self.rtol == 0 and self.atol == 0 else f"within rtol={self.rtol:g}, atol={self.atol:g}"
        n = sum(len(d.streams) for d in self.signals.values())
        f = self.first
        if f is not None:
            return f"first difference: {f.describe()}"
        if self.identical:
            return (f"identical: {n} streams agree {tol} at every step ({_steps(self.steps)}, "
                    f"{len(self.steps)} steps)")
        return f"no difference {tol} over the {len(self.steps)} common steps ({_steps(self.steps)}) of {n} streams"

    def to_text(self, max_rows: int = 20, max_columns: int = 16) -> str:
        """The terminal view: the runs, the verdict, the first difference per signal, the streams in one run
        only, and a streams x steps map (``X`` differs, ``.`` same, ``*`` the first difference)."""
        lines = [f"A: {self.a}  ({_steps(self.steps_a)}, {self.status[0]})",
                 f"B: {self.b}  ({_steps(self.steps_b)}, {self.status[1]})", "", self.verdict()]
        lines += [f"note: {n}" for n in self.notes]
        head = ("signal", "first step", "first stream", "statistics", "streams differing")
        rows = []
        for sig, d in self.signals.items():
            if d.first is None:
                rows.append((sig, "-", "-", "-", f"0 of {len(d.streams)}"))
                continue
            sp = d.spread()
            grow = ", ".join(f"{n} by step {st}" for st, n in (sp[:3] + ([sp[-1]] if len(sp) > 3 else [])))
            rows.append((sig, str(d.first.step), d.first.stream, " ".join(d.first.stats[:4])
                         + (" ..." if len(d.first.stats) > 4 else ""), f"{len(d.first_steps())} of "
                         f"{len(d.streams)}: {grow}"))
        lines += ["", *_table(head, rows)]
        for who, only in (("A", self.only_in_a), ("B", self.only_in_b)):
            if only:
                names = ", ".join(f"{n} ({s})" for s, n in only[:12]) + (f" and {len(only) - 12} more"
                                                                        if len(only) > 12 else "")
                lines.append(f"only in {who} ({len(only)} streams, not compared): {names}")
        if self.differs and len(self.steps):
            lines += ["", *self._map(max_rows, max_columns)]
        return "\n".join(lines)

    def _map(self, max_rows: int, max_columns: int) -> list[str]:
        """Streams x steps from just before the first difference, a column per step; the steps after the last
        column are folded into one (``>``)."""
        f = self.first
        t0 = max(0, int(np.searchsorted(self.steps, f.step)) - 2) if f is not None else 0
        t1 = min(len(self.steps), t0 + max_columns)
        width = max(len(str(int(self.steps[t]))) for t in range(t0, t1))
        rest = t1 < len(self.steps)
        tail = f" ('>': steps {int(self.steps[t1])}-{int(self.steps[-1])})" if rest else ""
        out = [f"streams x steps, X differs, . same, * first difference{tail}:"]
        rows: list[tuple[str, str]] = []
        for sig, d in self.signals.items():
            hit = [k for k in range(len(d.streams)) if d.differs[k].any()]
            if not hit:
                continue
            at = int(np.searchsorted(self.steps, d.first.step)) if d.first is not None else -1
            for k in range(hit[0], min(len(d.streams), hit[0] + max_rows)):  # from the first differing stream
                first = d.first is not None and d.streams[k] == d.first.stream
                cells = ["*" if first and t == at else ("X" if d.differs[k, t] else ".") for t in range(t0, t1)]
                if rest:
                    cells.append("X" if d.differs[k, t1:].any() else ".")
                rows.append((f"{sig[:4]} {d.streams[k]}", " ".join(c.rjust(width) for c in cells)))
            if len(d.streams) - hit[0] > max_rows:
                rows.append((f"{sig[:4]} ...", f"{len(d.streams) - hit[0] - max_rows} more streams"))
        name_w = max(len(r[0]) for r in rows) if rows else 10
        labels = [str(int(self.steps[t])).rjust(width) for t in range(t0, t1)] + ([">".rjust(width)] if rest else [])
        out.append(" " * (name_w + 2) + " ".join(labels))
        out += [f"{n.ljust(name_w)}  {c}" for n, c in rows]
        return out

    def figure(self) -> Any:
        """The divergence figure (a matplotlib ``Figure``, no pyplot): per signal a panel of streams x steps,
        coloured by the largest relative difference (white: equal), the first difference ringed."""
        from matplotlib.colors import LogNorm
        from matplotlib.figure import Figure

        panels = [d for d in self.signals.values() if d.streams]
        total = sum(len(d.streams) for d in panels) or 1
        fig = Figure(figsize=(10, min(40.0, 1.2 + 0.16 * total + 0.5 * len(panels))), dpi=110)
        if not panels or not len(self.steps):
            fig.text(0.5, 0.5, "nothing to compare", ha="center")
            return fig
        grid = fig.add_gridspec(len(panels), 1, height_ratios=[max(len(d.streams), 2) for d in panels])
        edges = _bins(len(self.steps), _MAX_FIGURE_COLUMNS)
        norm = LogNorm(1e-7, 1.0)
        im = None
        for row, d in enumerate(panels):
            ax = fig.add_subplot(grid[row])
            mag = np.stack([d.magnitude[:, lo:hi].max(axis=1) for lo, hi in zip(edges[:-1], edges[1:])], axis=1)
            shown = np.ma.masked_where(mag <= 0, np.clip(mag, 1e-7, 1.0))
            x0, x1 = float(self.steps[0]) - 0.5, float(self.steps[-1]) + 0.5
            im = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap="magma_r", norm=norm,
                           extent=(x0, x1, len(d.streams) - 0.5, -0.5))
            ax.set_facecolor("white")
            ax.set_yticks(range(len(d.streams)))
            ax.set_yticklabels(d.streams, fontsize=6 if len(d.streams) > 30 else 7)
            ax.set_ylabel(d.signal, fontsize=9)
            ax.tick_params(axis="x", labelsize=7)
            if d.first is not None:
                k = d.streams.index(d.first.stream)
                ax.plot([d.first.step], [k], marker="o", ms=11, mfc="none", mec="#00c8ff", mew=2.5)
                ax.annotate(f"first: step {d.first.step}, {d.first.stream}", (d.first.step, k), xytext=(10, -4),
                            textcoords="offset points", fontsize=8, color="black",
                            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "#00c8ff", "alpha": 0.9})
            else:
                ax.text(0.5, 0.5, "identical", transform=ax.transAxes, ha="center", va="center", color="#2a7")
        fig.axes[-1].set_xlabel("step")
        fig.suptitle(f"where the runs differ (relative difference){'' if self.differs else ': identical'}",
                     fontsize=10)
        if im is not None:
            fig.colorbar(im, ax=fig.axes, shrink=0.6, pad=0.01, label="|A - B| / max(|A|, |B|)")
        return fig

    def png(self) -> bytes:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        fig = self.figure()
        FigureCanvasAgg(fig)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()

    def to_html(self, title: Optional[str] = None) -> str:
        """One self-contained page: the verdict, the table per signal, the figure (inlined), the streams in one
        run only, and per signal each differing stream's first step."""
        e = html.escape
        title = title or "lit-probe diff"
        rows = []
        for sig, d in self.signals.items():
            f = d.first
            rows.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in (
                sig, "-" if f is None else f.step, "-" if f is None else f.stream,
                "-" if f is None else ", ".join(f"{s}: {_num(x)} vs {_num(y)}" for s, x, y in zip(f.stats, f.a, f.b)),
                f"{len(d.first_steps())} of {len(d.streams)}")) + "</tr>")
        uri = "data:image/png;base64," + base64.b64encode(self.png()).decode("ascii")
        only = "".join(f"<p><b>Only in {who}</b> ({len(o)} streams, not compared): "
                       + ", ".join(f"<code>{e(n)}</code> ({e(s)})" for s, n in o) + "</p>"
                       for who, o in (("A", self.only_in_a), ("B", self.only_in_b)) if o)
        spread = []
        for sig, d in self.signals.items():
            fs = d.first_steps()
            if fs:
                spread.append(f"<h3>{e(sig)}: {len(fs)} of {len(d.streams)} streams differ</h3><table><tr><th>"
                              "stream (execution order)</th><th>first differing step</th></tr>"
                              + "".join(f"<tr><td><code>{e(n)}</code></td><td>{fs[n]}</td></tr>"
                                        for n in d.streams if n in fs) + "</table>")
        notes = "".join(f"<li>{e(n)}</li>" for n in self.notes)
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}}.verdict{{font-size:1.2em}}
img{{max-width:100%}}</style></head><body>
<h1>{e(title)}</h1>
<p>A: <code>{e(self.a)}</code> ({e(_steps(self.steps_a))}, {e(self.status[0])})<br>
B: <code>{e(self.b)}</code> ({e(_steps(self.steps_b))}, {e(self.status[1])})</p>
<p class="verdict"><b>{e(self.verdict())}</b></p><ul>{notes}</ul>
<table><tr><th>signal</th><th>first step</th><th>first stream</th><th>statistics there (A vs B)</th>
<th>streams differing</th></tr>{''.join(rows)}</table>
{only}
<h2>Divergence</h2><img alt="streams x steps, the first difference ringed" src="{uri}">
{''.join(spread)}
</body></html>
"""


def write_diff_html(diff: RunDiff, path: str | os.PathLike[str], title: Optional[str] = None) -> Path:
    """Write :meth:`RunDiff.to_html` to ``path`` (atomically); returns it."""
    p = Path(path)
    atomic_write_text(p, diff.to_html(title))
    return p


# ---------------------------------------------------------------------------------------------------- compare
def diff_runs(run_a: str | os.PathLike[str], run_b: str | os.PathLike[str], *, rtol: float = 0.0,
              atol: float = 0.0) -> RunDiff:
    """Compare two probed runs (their save directories, or a directory holding ``probe/``).

    Args:
        rtol, atol: two values are equal when ``|a - b| <= atol + rtol * max(|a|, |b|)`` (both 0: the same
            float32 value); NaN (not measured) equals NaN only.

    Raises:
        FileNotFoundError: a run without a statistics log.
    """
    if rtol < 0 or atol < 0:
        raise ValueError(f"rtol and atol must be >= 0, got {rtol}, {atol}")
    da, db = find_save_dir(run_a), find_save_dir(run_b)
    la, lb = read_stats(da), read_stats(db)
    ra, rb = _record(da), _record(db)
    notes: list[str] = []
    for who, log in (("A", la), ("B", lb)):
        if log.torn:
            notes.append(f"{who}'s statistics end inside a chunk (the run was killed while writing): read up to "
                         f"step {int(log.steps[-1]) if len(log.steps) else -1}")
        if log.partial:
            notes.append(f"{who} failed inside step {', '.join(map(str, log.partial))}: not compared")
    ok_a = np.setdiff1d(la.steps, la.partial)
    ok_b = np.setdiff1d(lb.steps, lb.partial)
    steps = np.intersect1d(ok_a, ok_b)
    if not np.array_equal(la.steps, lb.steps):
        notes.append(f"the runs have different steps: A {_steps(la.steps)}, B {_steps(lb.steps)}; compared "
                     f"{_steps(steps)}")
    ia, ib = np.searchsorted(la.steps, steps), np.searchsorted(lb.steps, steps)
    stats = [s for s in la.stats if s in lb.stats]
    stats_only = sorted(set(la.stats) ^ set(lb.stats))
    if stats_only:
        notes.append(f"statistics in one run only (not compared): {', '.join(stats_only)}")
    signals: dict[str, SignalDiff] = {}
    only_a: list[tuple[str, str]] = []
    only_b: list[tuple[str, str]] = []
    for sig in (ACTIVATION, GRADIENT):
        oa, ob = _ordered(la, sig), _ordered(lb, sig)
        common = [n for n in oa if n in ob]
        only_a += [(sig, n) for n in oa if n not in ob]
        only_b += [(sig, n) for n in ob if n not in oa]
        if not common and not oa and not ob:
            continue
        sa = [la.slot(n, sig) for n in common]
        sb = [lb.slot(n, sig) for n in common]
        ka, kb = [la.stats.index(s) for s in stats], [lb.stats.index(s) for s in stats]
        A = la.values[ia][:, sa][:, :, ka] if common else np.zeros((len(steps), 0, len(stats)), np.float32)
        B = lb.values[ib][:, sb][:, :, kb] if common else np.zeros((len(steps), 0, len(stats)), np.float32)
        signals[sig] = _compare(sig, common, steps, A, B, stats, rtol, atol)
    if la.params is not None or lb.params is not None:
        pa, pb = _param_order(la), _param_order(lb)
        common = [n for n in pa if n in pb]
        only_a += [(PARAMETER, n) for n in pa if n not in pb]
        only_b += [(PARAMETER, n) for n in pb if n not in pa]
        pstats = [s for s in la.param_stats if s in lb.param_stats]
        if common and la.params is not None and lb.params is not None:
            ma = [la.param_names.index(n) for n in common]
            mb = [lb.param_names.index(n) for n in common]
            A = la.params[ia][:, ma][:, :, [la.param_stats.index(s) for s in pstats]]
            B = lb.params[ib][:, mb][:, :, [lb.param_stats.index(s) for s in pstats]]
            signals[PARAMETER] = _compare(PARAMETER, common, steps, A, B, pstats, rtol, atol)
    return RunDiff(str(da), str(db), float(rtol), float(atol), (ra.status if ra else "?", rb.status if rb else "?"),
                   la.steps, lb.steps, steps, signals, only_a, only_b, stats_only, (la.partial, lb.partial),
                   (la.torn, lb.torn), notes)


def _compare(signal: str, streams: list[str], steps: np.ndarray, A: np.ndarray, B: np.ndarray, stats: list[str],
             rtol: float, atol: float) -> SignalDiff:
    """``A``, ``B``: ``[steps, streams, stats]``."""
    a, b = A.astype(np.float64), B.astype(np.float64)
    with np.errstate(all="ignore"):
        na, nb = np.isnan(a), np.isnan(b)
        scale = np.maximum(np.abs(a), np.abs(b))
        gap = np.abs(a - b)
        close = (na & nb) | (a == b) | (~na & ~nb & (gap <= atol + rtol * scale))
        rel = np.where(na ^ nb, 1.0, np.where(scale > 0, gap / scale, 0.0))
        rel = np.where(close | ~np.isfinite(rel), np.where(close, 0.0, 1.0), rel)
    bad = ~close  # [steps, streams, stats]
    differs = bad.any(axis=2).T  # [streams, steps]
    magnitude = np.where(differs, np.maximum(rel.max(axis=2).T, 1e-7), 0.0) if rel.size else \
        np.zeros(differs.shape)
    first = None
    cols = np.flatnonzero(differs.any(axis=0))
    if cols.size:
        t = int(cols[0])
        k = int(np.flatnonzero(differs[:, t])[0])  # streams are in execution order
        which = np.flatnonzero(bad[t, k])
        first = FirstDifference(signal, int(steps[t]), streams[k], [stats[j] for j in which],
                                [float(A[t, k, j]) for j in which], [float(B[t, k, j]) for j in which],
                                int(differs[:, t].sum()))
    return SignalDiff(signal, streams, steps, differs, magnitude, first)


def _ordered(log: StatLog, signal: str) -> list[str]:
    """The streams of ``signal`` in execution order (slots never ordered last, in slot order)."""
    rank = {k: r for r, k in enumerate(log.order)}
    slots = [k for k in range(len(log.names)) if log.signals[k] == signal]
    return list(dict.fromkeys(log.names[k] for k in sorted(slots, key=lambda k: (rank.get(k, len(rank) + k), k))))


def _param_order(log: StatLog) -> list[str]:
    """Modules with parameters in the order their forward ran (their activation stream), then the others."""
    act = {n: r for r, n in enumerate(_ordered(log, ACTIVATION))}
    return sorted(log.param_names, key=lambda n: (act.get(n, len(act)), log.param_names.index(n)))


def _record(save_dir: Path) -> Optional[RunRecord]:
    try:
        return read_record(save_dir)
    except (FileNotFoundError, ValueError):
        return None


def _steps(steps: np.ndarray) -> str:
    if not len(steps):
        return "no steps"
    lo, hi = int(steps[0]), int(steps[-1])
    gaps = "" if hi - lo + 1 == len(steps) else f", {len(steps)} of them"
    return f"steps {lo}-{hi}{gaps}"


def _bins(n: int, most: int) -> list[int]:
    """Edges of at most ``most`` consecutive column groups over ``n`` columns."""
    if n <= most:
        return list(range(n + 1))
    size = -(-n // most)
    return list(range(0, n, size)) + [n]


def _num(x: float) -> str:
    return "nan" if x != x else f"{x:.6g}"


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return [line(head), line(tuple("-" * w for w in widths)), *[line(r) for r in rows]]
