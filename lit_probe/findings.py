"""Findings
========

The shared vocabulary between the detectors and everything that reports: :class:`Finding` and
:class:`Severity`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from typing import Any, Optional

from .vocab import CALL_SEP

__all__ = ["Finding", "Incident", "Severity", "KINDS", "ADVICE", "group_incidents", "incidents_of", "origin_text",
           "findings_to_markdown", "listed"]

KINDS = ("nonfinite", "exploding", "lr_too_high", "vanishing", "dead", "not_learning")
#: Kinds that one root cause produces together: an explosion turns into NaN downstream and later; a learning
#: rate too high for a layer comes before both.
_FAMILY = {"nonfinite": "instability", "exploding": "instability", "lr_too_high": "instability",
           "vanishing": "vanishing", "dead": "dead", "not_learning": "not_learning"}
#: What a consequence grouped under a cause of another kind is, per (cause kind, consequence kind).
_CONSEQUENCE = {
    ("vanishing", "not_learning"): "its gradient vanished, so the optimizer barely moves it (not a learning-rate "
    "problem)",
    ("dead", "vanishing"): "the dead units pass (almost) no gradient to the layers before them",
    ("dead", "not_learning"): "the dead units pass (almost) no gradient to it, so the optimizer barely moves it",
}
#: A finding joins an open incident of its family when it comes at most this many steps after the incident's
#: last finding.
INCIDENT_GAP = 50

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
    "lr_too_high": "each optimizer step moves this layer's weights by a large part of their size: lower the "
    "learning rate of its parameter group (or the global one), or add warm-up.",
    "not_learning": "the optimizer barely changes this layer: check its parameter group's learning rate (0?), "
    "that its parameters are in the optimizer, and whether its gradient vanishes.",
}


def listed(names: list[str], limit: int) -> str:
    """``"a, b, c, ..."``: the first ``limit`` names, and an ellipsis when there are more (messages for people)."""
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


class Severity(str, Enum):
    """How serious a finding is."""

    WARNING = "warning"
    ERROR = "error"


_SEVERITY = {"nonfinite": Severity.ERROR, "exploding": Severity.ERROR, "vanishing": Severity.WARNING,
             "dead": Severity.WARNING, "lr_too_high": Severity.WARNING, "not_learning": Severity.WARNING}


@dataclass(frozen=True)
class Finding:
    """One diagnosis: which layer, which signal, what went wrong, from which step.

    Attributes:
        step: the training step (``trainer.global_step`` under Lightning) while the batch that showed the problem
            ran (the first such step).
        layer: the *stream* the finding is about: the probed module's dotted path relative to the model, with
            ``#k`` for its k-th call in a step (``layer1.0.relu#1``; the first call has no suffix). For the
            ``"parameter"`` signal, the module's path. :attr:`module` is the path without the call suffix.
        signal: ``"activation"`` (the module's output), ``"gradient"`` (d loss / d output) or ``"parameter"``
            (the module's own weights, their gradients and the optimizer's update).
        kind: ``"dead"``, ``"exploding"``, ``"vanishing"``, ``"nonfinite"``, ``"lr_too_high"`` or
            ``"not_learning"``.
        value: the measured value that crossed the threshold (dead fraction, absmax, rms, non-finite count).
        threshold: the threshold it was compared with.
        message: a sentence for people.
        stat: the name of the statistic ``value`` is.
        incident: the id of the :class:`Incident` the finding belongs to (-1 before grouping).
        cause: whether this finding is its incident's cause (its first stream and step).
        ranks: under several processes, the rank(s) where a non-finite value appeared at that step and stream,
            or the rank with the largest ``|value|`` of an explosion; ``[]`` on one process or for findings on
            every rank's merged statistics (dead units, vanishing, the parameter rules).
        batch: the index of the batch within its epoch (``batch_idx``) that ran at :attr:`step`, when the loop
            said it (``None``: not known, e.g. a step older than the run kept).
        epoch: that batch's epoch (``None``: not known).
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
    incident: int = -1
    cause: bool = False
    ranks: list = field(default_factory=list, compare=False)
    batch: Optional[int] = None
    epoch: Optional[int] = None

    @property
    def severity(self) -> Severity:
        return _SEVERITY.get(self.kind, Severity.WARNING)

    @property
    def stream(self) -> str:
        """The stream (module path and call, see :attr:`layer`)."""
        return self.layer

    @property
    def module(self) -> str:
        """The probed module's dotted path (:attr:`layer` without its ``#k`` call suffix)."""
        return self.layer.split(CALL_SEP, 1)[0]

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

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Finding":
        """The inverse of :meth:`to_dict` (and of a checkpoint's state): ``"nan"``/``"inf"`` strings become
        floats again, unknown keys (``severity``) are ignored, ``extra`` is kept."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("value", "threshold"):
            if k in kw:
                kw[k] = float(kw[k])
        kw["extra"] = dict(kw.get("extra") or {})
        kw["ranks"] = [int(r) for r in kw.get("ranks") or []]
        return cls(**kw)

    @property
    def origin(self) -> str:
        """Where in the run the finding came from, for people: ``"rank 1 · batch 5 of epoch 0"`` (``""`` when
        neither is known)."""
        return origin_text(self.ranks, self.batch, self.epoch)

    def __str__(self) -> str:
        return self.message or f"{self.kind} {self.signal} at {self.layer} (step {self.step})"


def origin_text(ranks: Any, batch: Optional[int], epoch: Optional[int]) -> str:
    """``"rank 1 · batch 5 of epoch 0"``, ``"ranks 0, 1"``, ``"batch 5"``, or ``""``."""
    parts = []
    if ranks:
        parts.append(("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(int(r)) for r in ranks))
    if batch is not None:
        parts.append(f"batch {int(batch)}" + (f" of epoch {int(epoch)}" if epoch is not None else ""))
    return " · ".join(parts)


@dataclass(frozen=True)
class Incident:
    """One root cause: its first stream and step (the cause), and the streams it reached after.

    Attributes:
        id: the incident's number, in order of appearance.
        kind: the cause's kind (``"nonfinite"``, ``"exploding"``, ``"vanishing"``, ``"dead"``).
        signal: the cause's signal.
        step: the cause's step.
        layer: the cause's stream.
        layers: the other streams it reached, in the order their findings came.
        count: findings in the incident.
        consequences: one line per finding of another kind that the cause explains (grouped under it rather than
            opening an incident of its own, see :func:`group_incidents`): ``"`net.0` not_learning (step 12): ..."``.
        ranks, batch, epoch: the cause's (:attr:`Finding.ranks`, :attr:`Finding.batch`, :attr:`Finding.epoch`).
    """

    id: int
    kind: str
    signal: str
    step: int
    layer: str
    layers: tuple[str, ...]
    count: int
    consequences: tuple[str, ...] = ()
    ranks: tuple[int, ...] = ()
    batch: Optional[int] = None
    epoch: Optional[int] = None

    @property
    def advice(self) -> str:
        return ADVICE.get(self.kind, "")

    @property
    def origin(self) -> str:
        """Where the cause came from: ``"rank 1 · batch 5 of epoch 0"`` (``""`` when not known)."""
        return origin_text(self.ranks, self.batch, self.epoch)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        d["consequences"] = list(self.consequences)
        d["ranks"] = list(self.ranks)
        return d


def group_incidents(previous: list[Finding], new: list[Finding]) -> tuple[list[Finding], list[Finding]]:
    """Assign ``new`` findings (in the order the detectors give: step, activation before gradient, execution
    order) to incidents, after the already grouped ``previous`` ones. Pure.

    A finding joins the open incident of its family (non-finite and exploding are one family: an explosion
    turns into NaN) when it comes at most :data:`INCIDENT_GAP` steps after that incident's last finding;
    otherwise it opens a new incident and is its cause. Contradictions are dropped: a ``vanishing`` or ``dead``
    finding that began after an open instability incident began (the median and the units of a diverging run
    mean nothing; a unit dead *before* the explosion may be its cause and is kept), and a second finding of one
    stream at one step.

    Consequences join their cause's incident instead of opening one (``extra["consequence_of"]``: the cause's
    kind; the message says so): a ``not_learning`` module that is (in, or contains) a stream of an open
    ``vanishing`` incident, within :data:`INCIDENT_GAP` steps (its gradient vanished, so it cannot learn); a
    ``vanishing`` or ``not_learning`` finding from the onset of an open ``dead`` incident on, within the gap,
    while no vanishing incident is open (dead units pass no gradient to the layers before them). Within one call,
    ``not_learning`` findings are grouped after the others (both rules need a window of steps; the vanishing one
    of the same flush may come a step later), and returned in the order given.

    Returns:
        ``(kept, dropped)``: the new findings with ``incident`` and ``cause`` set, and those suppressed.
    """
    groups: dict[str, list[int]] = {}  # family -> [incident id, first step, last step]
    next_id = 0
    for f in sorted(previous, key=lambda f: (f.incident, f.step)):
        fam = _FAMILY.get(f.kind, f.kind)
        g = groups.get(fam)
        if g is None or g[0] != f.incident:
            groups[fam] = [f.incident, f.step, f.step]
        else:
            g[2] = max(g[2], f.step)
        next_id = max(next_id, f.incident + 1)
    seen = {(f.layer, f.step, f.signal == "parameter") for f in previous}
    cause_of: dict[int, Finding] = {f.incident: f for f in previous if f.cause}
    modules: dict[int, set[str]] = {}  # incident id -> the modules of its findings
    for f in previous:
        modules.setdefault(f.incident, set()).add(f.module)
    placed: dict[int, Finding] = {}
    dropped: list[Finding] = []
    order = [k for k, f in enumerate(new) if f.kind != "not_learning"] + \
        [k for k, f in enumerate(new) if f.kind == "not_learning"]
    for k in order:
        f = new[k]
        fam = _FAMILY.get(f.kind, f.kind)
        inst = groups.get("instability")
        onset = int(f.extra.get("since", f.step)) if f.kind == "dead" else f.step
        if fam in ("vanishing", "dead", "not_learning") and inst is not None and f.step <= inst[2] + INCIDENT_GAP \
                and onset > inst[1]:
            dropped.append(f)
            continue
        key = (f.layer, f.step, f.signal == "parameter")  # a layer's parameters are not one of its streams
        if key in seen and f.kind != "nonfinite":
            dropped.append(f)
            continue
        seen.add(key)
        host = _explaining(groups, modules, f)
        if host is not None:
            g, why = host
            g[2] = max(g[2], f.step)
            cause = cause_of.get(g[0])
            where = f" of incident {g[0]}" + (f" (`{cause.layer}`, step {cause.step})" if cause is not None else "")
            msg = f"{f.message} A consequence of the {why}{where}, not a separate problem." if f.message else ""
            placed[k] = replace(f, incident=g[0], cause=False, message=msg or f.message,
                                extra={**f.extra, "consequence_of": cause.kind if cause is not None else why})
            modules.setdefault(g[0], set()).add(f.module)
            continue
        g = groups.get(fam)
        if g is not None and f.step <= g[2] + INCIDENT_GAP:
            g[2] = max(g[2], f.step)
            placed[k] = replace(f, incident=g[0], cause=False)
        else:
            groups[fam] = g = [next_id, f.step, f.step]
            placed[k] = replace(f, incident=next_id, cause=True)
            cause_of[next_id] = placed[k]
            next_id += 1
        modules.setdefault(g[0], set()).add(f.module)
    return [placed[k] for k in sorted(placed)], dropped


def _explaining(groups: dict[str, list[int]], modules: dict[int, set[str]],
                f: Finding) -> tuple[list[int], str] | None:
    """The open incident whose cause explains ``f`` (see :func:`group_incidents`), and what it is."""
    van, dead = groups.get("vanishing"), groups.get("dead")
    van_open = van is not None and f.step <= van[2] + INCIDENT_GAP
    if f.kind == "not_learning" and van is not None and van_open:
        mine = f.module
        if any(m == mine or m.startswith(mine + ".") or mine.startswith(m + ".") for m in modules.get(van[0], ())):
            return van, "vanishing gradient"
    if f.kind in ("vanishing", "not_learning") and dead is not None and dead[1] <= f.step <= dead[2] + INCIDENT_GAP \
            and not van_open:
        return dead, "dead units (they pass no gradient to the layers before them)"
    return None


def incidents_of(findings: list[Finding]) -> list[Incident]:
    """The incidents of grouped findings, in order of their cause's step."""
    by_id: dict[int, list[Finding]] = {}
    for f in findings:
        by_id.setdefault(f.incident, []).append(f)
    out = []
    for iid, fs in by_id.items():
        cause = next((f for f in fs if f.cause), fs[0])
        layers = tuple(dict.fromkeys(f.layer for f in fs if f is not cause and f.layer != cause.layer))
        consequences = tuple(
            [f"`{f.layer}` {f.kind} (step {f.step}): {_CONSEQUENCE.get((cause.kind, f.kind), '')}"
             for f in sorted(fs, key=lambda f: f.step) if f.extra.get("consequence_of")]
            + [f"blocked (step {f.step}): no gradient at all reaches {listed([f'`{b}`' for b in f.extra['blocked']], 8)}"
               f", the layers before the dead units of `{f.layer}`" for f in fs
               if f.kind == "dead" and f.extra.get("blocked")])
        out.append(Incident(iid, cause.kind, cause.signal, cause.step, cause.layer, layers, len(fs), consequences,
                            tuple(int(r) for r in cause.ranks), cause.batch, cause.epoch))
    return sorted(out, key=lambda x: (x.step, x.id))


def findings_to_markdown(findings: list[Finding], title: str = "lit-probe summary",
                         extra_lines: list[str] | None = None) -> str:
    """A human-readable ``summary.md``: incidents first, then every finding, one line of advice per kind."""
    lines = [f"# {title}", ""]
    lines += list(extra_lines or [])
    if extra_lines:
        lines.append("")
    if not findings:
        lines.append("No findings: every probed layer stayed within the thresholds.")
        return "\n".join(lines) + "\n"
    incidents = incidents_of(findings)
    lines += ["## Incidents (root causes first)", "",
              "| # | cause: stream | signal | kind | step | then reached |", "| ---: | --- | --- | --- | ---: | --- |"]
    for inc in incidents:
        reached = ", ".join(f"`{x}`" for x in inc.layers[:6]) + (f" and {len(inc.layers) - 6} more"
                                                                   if len(inc.layers) > 6 else "")
        at = f"{inc.step} ({inc.origin})" if inc.origin else f"{inc.step}"
        lines.append(f"| {inc.id} | `{inc.layer}` | {inc.signal} | {inc.kind} | {at} | {reached or '-'} |")
    explained = [inc for inc in incidents if inc.consequences]
    if explained:
        lines += ["", "## Consequences (grouped under their cause, not separate problems)", ""]
        for inc in explained:
            lines += [f"- incident {inc.id} ({inc.kind} at `{inc.layer}`): {c}" for c in inc.consequences]
    lines += ["", "## What to do", ""]
    for kind in KINDS:
        if any(i.kind == kind for i in incidents):
            lines.append(f"- **{kind}**: {ADVICE[kind]}")
    lines += ["", "## Findings", "", "| incident | step | stream | signal | kind | value | threshold |",
              "| ---: | ---: | --- | --- | --- | ---: | ---: |"]
    for f in sorted(findings, key=lambda f: (f.incident, f.step)):
        at = f"{f.step} ({f.origin})" if f.origin else f"{f.step}"
        lines.append(f"| {f.incident} | {at} | `{f.layer}` | {f.signal} | {f.kind} | {f.value:.4g} | "
                     f"{f.threshold:.4g} |")
    lines += ["", "## Details", ""] + [f"- step {f.step}: {f.message}" for f in findings]
    return "\n".join(lines) + "\n"
