"""Record
======

:class:`RunRecord` is the one output contract of a probed run: a torch-free description of what the run
measured and concluded, written as ``<save_dir>/run.json`` by one owner (:class:`~lit_probe.output.ProbeOutput`)
when the run starts, whenever findings or figures arrive, and when it ends. ``summary.md``, ``report.html`` and
``lit-probe report SAVE_DIR`` are views of it; nothing reads a view back.

What it holds (each JSON-native):

* ``status``: ``"running"`` (the file of a run still going, or killed), ``"finished"`` or ``"failed"``;
* ``layers``: the probed module paths in registration order; ``streams``: every stream (one module call, see
  :mod:`lit_probe.vocab`) in the order its first call happened, with its module, call index and unit layout;
* ``findings`` (:meth:`~lit_probe.findings.Finding.to_dict` rows) and ``incidents`` (grouped by
  :mod:`lit_probe.findings`, never derived again);
* ``figures``: the figure index, one row per file the disk sink wrote: ``{layer, figure, tag, step, file}``
  (``tag``: ``""`` a routine figure, ``"at"`` the step that fired, ``"before"`` the last one before it; ``file``
  relative to the save directory);
* ``notes`` (lines for people: what was said during the run), ``never_ran``, ``skipped_steps`` (GradScaler
  skips), ``figures_skipped`` (figures not drawn, and why), ``last_step``;
* ``stats``: where the per-step statistics are (``{"file": "stats.bin", "bytes": ..., "stopped_at": step}``,
  :mod:`lit_probe.statlog`; ``{}`` when none are kept).

Nothing here imports torch, matplotlib or Lightning: a record is read on any machine.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from .findings import Finding, findings_to_markdown, incidents_of
from .sinks import atomic_write_text

__all__ = ["RunRecord", "RECORD_NAME", "SUMMARY_NAME", "FINDINGS_NAME", "read_record"]

#: The record's file name in the save directory.
RECORD_NAME = "run.json"
#: The human summary rendered from the record.
SUMMARY_NAME = "summary.md"
#: Findings as they arrive, one JSON object a line (appended while training runs; the record holds them too).
FINDINGS_NAME = "findings.jsonl"
_VERSION = 1


@dataclass
class RunRecord:
    """The run's record (see the module docstring). Build with the run's probed layers; the output adds to it."""

    layers: list[str] = field(default_factory=list)
    streams: list[dict[str, Any]] = field(default_factory=list)
    status: str = "running"
    loop: str = ""
    started: float = field(default_factory=time.time)
    ended: Optional[float] = None
    last_step: int = -1
    findings: list[dict[str, Any]] = field(default_factory=list)
    incidents: list[dict[str, Any]] = field(default_factory=list)
    figures: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    never_ran: list[str] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    figures_skipped: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    version: int = _VERSION

    # ------------------------------------------------------------------ building
    def set_findings(self, findings: Sequence[Finding]) -> None:
        """Every finding so far (grouped): rows in incident order, and their incidents."""
        ordered = sorted(findings, key=lambda f: (f.incident, not f.cause, f.step))
        self.findings = [f.to_dict() for f in ordered]
        self.incidents = [i.to_dict() for i in incidents_of(list(findings))]

    def note(self, line: str) -> None:
        if line not in self.notes:
            self.notes.append(line)

    # ------------------------------------------------------------------ reading
    def finding_objects(self) -> list[Finding]:
        return [Finding.from_dict(row) for row in self.findings]

    def stream_order(self) -> list[str]:
        """Streams and probed layers in execution order (streams first, then layers never seen as a stream)."""
        names = [str(s.get("name", "")) for s in self.streams]
        return list(dict.fromkeys(names + list(self.layers)))

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunRecord":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, save_dir: str | os.PathLike[str]) -> Path:
        """Write ``run.json`` atomically (a reader never sees half a record)."""
        path = Path(save_dir) / RECORD_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, default=str) + "\n")
        return path

    def note_lines(self) -> list[str]:
        """The record's lines for people (probed layers, GradScaler skips, layers that never ran, figures not
        drawn, what was said during the run): the notes of ``summary.md`` and of the report."""
        lines = [f"probed layers ({len(self.layers)}): " + ", ".join(f"`{p}`" for p in self.layers[:50])
                 + (f" and {len(self.layers) - 50} more" if len(self.layers) > 50 else "")]
        if self.skipped_steps:
            lines.append(f"steps skipped by the GradScaler (inf/NaN gradients by design): {self.skipped_steps[:20]}")
        if self.never_ran:
            lines.append("layers that never ran: " + ", ".join(f"`{n}`" for n in self.never_ran))
        if self.figures_skipped:
            lines.append("figures not drawn: " + "; ".join(self.figures_skipped[:10]))
        return lines + list(self.notes)

    def status_line(self) -> str:
        """What the status means for a reader ("" when the run finished)."""
        return {"failed": "the run ended with an exception; statistics up to the last completed step are included",
                "running": "the run had not ended when its record was last written (still running, or killed): what "
                           "follows is up to that point"}.get(self.status, "")

    def summary_markdown(self) -> str:
        """``summary.md``: the notes, then the incidents and findings (a view of the record)."""
        lines = [f"- {line}" for line in ([self.status_line()] if self.status_line() else []) + self.note_lines()]
        return findings_to_markdown(self.finding_objects(), extra_lines=lines)


def read_record(save_dir: str | os.PathLike[str]) -> RunRecord:
    """The record of the run in ``save_dir``.

    Raises:
        FileNotFoundError: there is no ``run.json`` (not a lit-probe save directory, or a run from before 0.3).
        ValueError: the file is not a run record.
    """
    path = Path(save_dir) / RECORD_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no {RECORD_NAME} in {save_dir}: not the save directory of a lit-probe run") from None
    if not isinstance(data, dict) or "findings" not in data:
        raise ValueError(f"{path} is not a lit-probe run record")
    return RunRecord.from_dict(data)
