"""Findings
========

The shared vocabulary between the detectors and everything that reports: :class:`Finding` and
:class:`Severity`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

__all__ = ["Finding", "Severity", "KINDS", "SIGNALS", "ADVICE", "findings_to_markdown"]

SIGNALS = ("activation", "gradient")
KINDS = ("nonfinite", "exploding", "vanishing", "dead")

#: One line of advice per finding kind, printed in summaries and the demo.
ADVICE = {
    "nonfinite": "NaN/Inf first appeared here: look for a division, log, sqrt or exp in this layer, a too-high "
    "learning rate, or fp16 overflow; `gradient_clip_val` and a lower LR are the usual fixes.",
    "exploding": "values grew far beyond their usual range: lower the learning rate, add normalisation or "
    "gradient clipping, and check the initialisation of this layer.",
    "vanishing": "gradients are tiny here: saturating activations (sigmoid/tanh) or a deep plain stack; use "
    "ReLU-like activations, residual connections, normalisation or a better initialisation.",
    "dead": "most units never fired over the window: check a large negative bias, a too-high learning rate, "
    "or use LeakyReLU/GELU and a careful initialisation.",
}


class Severity(str, Enum):
    """How serious a finding is."""

    WARNING = "warning"
    ERROR = "error"


_SEVERITY = {"nonfinite": Severity.ERROR, "exploding": Severity.ERROR, "vanishing": Severity.WARNING,
             "dead": Severity.WARNING}


@dataclass(frozen=True)
class Finding:
    """One diagnosis: which layer, which signal, what went wrong, from which step.

    Attributes:
        step: ``trainer.global_step`` while the batch that showed the problem ran (the first such step).
        layer: the probed module's dotted name, relative to the LightningModule.
        signal: ``"activation"`` (the module's output) or ``"gradient"`` (d loss / d output).
        kind: ``"dead"``, ``"exploding"``, ``"vanishing"`` or ``"nonfinite"``.
        value: the measured value that crossed the threshold (dead fraction, absmax, rms, non-finite count).
        threshold: the threshold it was compared with.
        message: a sentence for people.
        stat: the name of the statistic ``value`` is.
    """

    step: int
    layer: str
    signal: str
    kind: str
    value: float
    threshold: float
    message: str = ""
    stat: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def severity(self) -> Severity:
        return _SEVERITY.get(self.kind, Severity.WARNING)

    @property
    def advice(self) -> str:
        return ADVICE.get(self.kind, "")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["severity"] = self.severity.value
        for k in ("value", "threshold"):
            v = d[k]
            if v != v or v in (float("inf"), float("-inf")):  # JSON has no NaN/Inf: keep them readable
                d[k] = str(v)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def __str__(self) -> str:
        return self.message or f"{self.kind} {self.signal} at {self.layer} (step {self.step})"


def findings_to_markdown(findings: list[Finding], title: str = "lit-probe summary",
                         extra_lines: list[str] | None = None) -> str:
    """A human-readable ``summary.md``: a table of findings and one line of advice per kind."""
    lines = [f"# {title}", ""]
    lines += list(extra_lines or [])
    if extra_lines:
        lines.append("")
    if not findings:
        lines.append("No findings: every probed layer stayed within the thresholds.")
        return "\n".join(lines) + "\n"
    lines += ["| step | layer | signal | kind | value | threshold |", "| ---: | --- | --- | --- | ---: | ---: |"]
    for f in sorted(findings, key=lambda f: (f.step, KINDS.index(f.kind) if f.kind in KINDS else 99)):
        lines.append(f"| {f.step} | `{f.layer}` | {f.signal} | {f.kind} | {f.value:.4g} | {f.threshold:.4g} |")
    lines += ["", "## What to do", ""]
    for kind in KINDS:
        if any(f.kind == kind for f in findings):
            lines.append(f"- **{kind}**: {ADVICE[kind]}")
    lines.append("")
    lines += ["## Details", ""] + [f"- step {f.step}: {f.message}" for f in findings]
    return "\n".join(lines) + "\n"
