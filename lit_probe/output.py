"""Output
======

:class:`ProbeOutput` owns everything that leaves the process: scalars to the trainer's loggers, findings as
they arrive (``findings.jsonl``, a ``ProbeWarning``, the W&B findings table, the flight recorder CSV), figure
files and images (disk, W&B, TensorBoard) through the renderer, and at the end ``summary.md``,
``incidents.json`` and ``report.html``. The callback calls its verbs; nothing else writes.

Only rank zero writes (``is_zero``); other ranks get an output that does nothing. Imports neither Lightning
nor wandb (the sinks import wandb lazily).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

from .findings import Finding, findings_to_markdown, incidents_of

__all__ = ["ProbeOutput", "ProbeWarning"]

log = logging.getLogger("lit_probe")

_MAX_WARNINGS_PER_FLUSH = 8
#: Seconds fit end waits for queued figures before it reports the rest as skipped.
CLOSE_TIMEOUT_S = 10.0


class ProbeWarning(UserWarning):
    """The category of the warnings ``FeatureProbe(on_finding="warn")`` emits for findings."""


class ProbeOutput:
    """Every way out of the process for one run.

    Args:
        out_dir: ``save_dir`` of the run.
        loggers: the trainer's loggers (anything with ``log_metrics(metrics, step=)``).
        is_zero: whether this process writes (rank zero).
        figures: figure kinds to draw; empty: no figures.
        figure_every_n_steps: figure steps (``None``: no figures).
        max_figure_layers: layers drawn per figure step besides those with findings (``None``: all).
        max_channels: channels per feature-map grid.
        mode: ``"overwrite"`` or ``"versioned"`` figure files.
        max_versions: with versioned files, the newest N kept per figure.
        log_to_wandb: push figures and findings to a ``WandbLogger`` of the trainer (or an active run).
        flight_recorder_steps: rows of history written to ``flight_recorder_step<step>.csv`` on a finding.
        warn: emit a :class:`ProbeWarning` per finding (rate-limited).
        close_timeout: seconds the end of the run waits for queued figures (``None``: all of them).
    """

    def __init__(self, out_dir: Path, loggers: Sequence[Any], *, is_zero: bool, figures: Sequence[str] = (),
                 figure_every_n_steps: int | None = None, max_figure_layers: int | None = 16,
                 max_channels: int = 64, mode: str = "overwrite", max_versions: int | None = None,
                 log_to_wandb: bool = True, flight_recorder_steps: int = 200, warn: bool = True,
                 close_timeout: float | None = CLOSE_TIMEOUT_S) -> None:
        self.out_dir = Path(out_dir)
        self.loggers = list(loggers or [])
        self.is_zero = is_zero
        self.figure_kinds = tuple(figures) if figure_every_n_steps is not None else ()
        self.figure_every_n_steps = figure_every_n_steps
        self.max_figure_layers = max_figure_layers
        self.flight_recorder_steps = flight_recorder_steps
        self.warn = warn
        self.close_timeout = close_timeout
        self.said: set[str] = set()
        self.skipped: list[str] = []
        self.renderer: Any = None
        self.disk: Any = None
        self._wandb: list[Any] = []
        self._jsonl_ok = True
        self._findings_pushed = 0
        if not is_zero:
            return
        self._open_sinks(mode, max_channels, max_versions, log_to_wandb)

    def start(self, restored: Sequence[Finding] = ()) -> None:
        """A run begins: ``findings.jsonl`` restarts with the findings restored from a checkpoint (if any)."""
        path = self.out_dir / "findings.jsonl"
        if not self.is_zero or (not restored and not path.exists()):
            return
        if self._writable():
            try:
                from .sinks import atomic_write_text

                atomic_write_text(path, "".join(f.to_json() + "\n" for f in restored))
            except OSError as err:
                self._disk_failed(err)

    def _open_sinks(self, mode: str, max_channels: int, max_versions: int | None, log_to_wandb: bool) -> None:
        try:
            from .sinks import DiskSink, WandbSink, image_sinks_for
        except Exception as err:  # pragma: no cover - matplotlib/pillow missing
            self.say(f"lit_probe: figures and W&B output disabled ({type(err).__name__}: {err}).")
            return
        sinks, info = image_sinks_for(self.loggers, log_to_wandb=log_to_wandb, defer_wandb=True)
        self._wandb = [s for s in sinks if isinstance(s, WandbSink)]
        if not self.figure_kinds:
            return
        for msg in info:
            self.say(f"lit_probe: {msg}")
        try:
            from .render import FigureRenderer
        except Exception as err:  # pragma: no cover
            self.say(f"lit_probe: figures disabled ({type(err).__name__}: {err}).")
            return
        self.disk = DiskSink(self.out_dir, mode=mode, max_versions=max_versions)  # type: ignore[arg-type]
        n = self.max_figure_layers if self.max_figure_layers is not None else 256
        self.renderer = FigureRenderer([self.disk] + sinks, figures=self.figure_kinds, max_channels=max_channels,
                                       max_queue=2 * (n + 8) + 2)

    # ------------------------------------------------------------------ verbs
    def say(self, msg: str) -> None:
        """Log ``msg`` once (rank zero)."""
        if msg in self.said or not self.is_zero:
            return
        self.said.add(msg)
        log.warning(msg)

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        """Log ``metrics`` to every logger at ``step``."""
        if not metrics or not self.is_zero:
            return
        for logger in self.loggers:
            try:
                logger.log_metrics(metrics, step=step)
            except Exception as err:
                self.say(f"lit_probe: logger {type(logger).__name__} rejected probe metrics ({err}).")

    def findings(self, new: list[Finding], everything: list[Finding], step: int,
                 history_csv: Callable[[int], str] | None = None) -> None:
        """Report findings as they arrive: a line each in ``findings.jsonl``, a warning, the flight recorder,
        the W&B findings table at ``step``, and keep the last figures from before an instability."""
        if not new or not self.is_zero:
            return
        if self.warn:
            for f in new[:_MAX_WARNINGS_PER_FLUSH]:
                warnings.warn(f"lit_probe: {f.message}", ProbeWarning, stacklevel=3)
            if len(new) > _MAX_WARNINGS_PER_FLUSH:
                warnings.warn(f"lit_probe: {len(new) - _MAX_WARNINGS_PER_FLUSH} more finding(s) at step {step}; "
                              f"see findings.jsonl in {self.out_dir}.", ProbeWarning, stacklevel=3)
        if self._writable():
            try:
                with open(self.out_dir / "findings.jsonl", "a", encoding="utf-8") as fh:
                    fh.writelines(f.to_json() + "\n" for f in new)
                if history_csv is not None:
                    from .sinks import atomic_write_text

                    atomic_write_text(self.out_dir / f"flight_recorder_step{step:06d}.csv",
                                      history_csv(self.flight_recorder_steps))
            except OSError as err:
                self._disk_failed(err)
        if self.disk is not None:
            for f in new:
                if f.kind in ("nonfinite", "exploding"):
                    self.disk.keep_before(f.layer, f.step)
        self._push_findings(everything, step)

    def _push_findings(self, everything: list[Finding], step: int) -> None:
        if not self._wandb or len(everything) == self._findings_pushed:
            return
        rows = [f.to_dict() for f in sorted(everything, key=lambda f: (f.incident, not f.cause, f.step))]
        for sink in self._wandb:
            try:
                sink.write_findings(rows, step)
            except Exception as err:
                self.say(f"lit_probe: could not push findings to W&B ({err}).")
        self._findings_pushed = len(everything)

    def figures(self, step: int, snapshots: Sequence[Any], with_findings: set[str]) -> None:
        """Queue the figures of one figure step: the streams with findings, then up to ``max_figure_layers``
        others spread over the model; what is not drawn is said once."""
        if self.renderer is None or not snapshots:
            return
        for snap in self._pick(snapshots, lambda s: s.name, with_findings):
            self.renderer.submit_layer(step, snap.name, snap.activation, snap.gradient, snap.dead,
                                       layout=snap.layout, shape=snap.shape)

    def parameters(self, step: int, hists: Mapping[str, tuple[Any, Any]], numel: Mapping[str, int],
                   with_findings: set[str]) -> None:
        """Queue the weight / parameter-gradient histograms of one figure step (same layer choice as
        :meth:`figures`)."""
        if self.renderer is None or not hists or "parameters" not in self.figure_kinds:
            return
        for name in self._pick(list(hists), lambda n: n, with_findings):
            w, g = hists[name]
            self.renderer.submit_parameters(step, name, w, g, int(numel.get(name, len(w))))

    def _pick(self, items: Sequence[Any], name: Callable[[Any], str], with_findings: set[str]) -> list[Any]:
        first = [x for x in items if name(x) in with_findings]
        rest = [x for x in items if name(x) not in with_findings]
        n = self.max_figure_layers
        if n is not None and len(rest) > n:
            pick = sorted({round(k * (len(rest) - 1) / max(n - 1, 1)) for k in range(n)}) if n > 0 else []
            self.say(f"lit_probe: figures of {len(pick)} of {len(rest)} layers without findings are drawn per "
                     f"figure step (max_figure_layers={n}); layers with findings are always drawn.")
            rest = [rest[k] for k in pick]
        return first + rest

    def timeline(self, step: int, tl: Any) -> None:
        """Queue the health timeline."""
        if self.renderer is None or tl is None or "timeline" not in self.figure_kinds:
            return
        self.renderer.submit_timeline(step, tl.names, tl.steps, tl.act_rms, tl.grad_rms, tl.dead, tl.marks)

    def gradcam(self, step: int, maps: Sequence[tuple[str, Any, list[str]]]) -> None:
        """Queue Grad-CAM figures: ``(layer, overlays [n, H, W, 3], labels)`` each."""
        if self.renderer is None:
            return
        for name, overlays, labels in maps:
            self.renderer.submit_gradcam(step, name, overlays, labels)

    def flush(self) -> None:
        """At a log step, on the training thread: push queued W&B images."""
        if self.renderer is not None:
            try:
                self.renderer.flush_sinks()
            except Exception as err:
                self.say(f"lit_probe: could not push figures ({err}).")

    def close(self, findings: list[Finding], extra_lines: list[str], final_timeline: Any = None,
              step: int = 0) -> None:
        """End of the run (fit end or failure): bounded wait for figures, then summary, incidents, report."""
        if not self.is_zero:
            return
        if findings and len(findings) != self._findings_pushed:
            self._push_findings(findings, step)  # the table of every finding, once more at the end
        if self.renderer is not None:
            r, self.renderer = self.renderer, None
            try:
                if final_timeline is not None and "timeline" in self.figure_kinds:
                    r.submit_timeline(step, final_timeline.names, final_timeline.steps, final_timeline.act_rms,
                                      final_timeline.grad_rms, final_timeline.dead, final_timeline.marks,
                                      urgent=True)  # ahead of the queue: the fit-end time bound never drops it
                r.close(self.close_timeout)
                r.flush_sinks()  # every sink once, W&B included
                lines = list(getattr(r, "skipped_summary", lambda: [])())
                if not lines and getattr(r, "dropped", 0):
                    lines = [f"{r.dropped} figure job(s) not drawn (queue full or fit-end timeout)"]
                self.skipped += lines
                for line in lines:
                    self.say(f"lit_probe: {line}")
            except Exception as err:
                self.say(f"lit_probe: figure output failed at the end ({err}).")
        else:
            for sink in self._wandb:
                try:
                    sink.flush()
                except Exception as err:
                    self.say(f"lit_probe: could not push to W&B at the end ({err}).")
        self._write_final(findings, extra_lines)

    # ------------------------------------------------------------------ files
    def _writable(self) -> bool:
        if not self._jsonl_ok:
            return False
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            return True
        except OSError as err:
            self._disk_failed(err)
            return False

    def _disk_failed(self, err: OSError) -> None:
        self._jsonl_ok = False
        self.say(f"lit_probe: cannot write to {self.out_dir} ({err}); findings stay in `probe.findings`.")

    def _write_final(self, findings: list[Finding], extra_lines: list[str]) -> None:
        from .sinks import atomic_write_text

        lines = list(extra_lines)
        if self.skipped:
            lines.append("- figures not drawn: " + "; ".join(self.skipped[:10]))
        if not self._jsonl_ok:
            return
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            ordered = sorted(findings, key=lambda f: (f.incident, not f.cause, f.step))
            atomic_write_text(self.out_dir / "findings.jsonl", "".join(f.to_json() + "\n" for f in ordered))
            atomic_write_text(self.out_dir / "incidents.json",
                              json.dumps([i.to_dict() for i in incidents_of(findings)], indent=1) + "\n")
            atomic_write_text(self.out_dir / "summary.md", findings_to_markdown(findings, extra_lines=lines))
        except OSError as err:
            self._disk_failed(err)
            return
        try:
            from .report import write_report

            write_report(self.out_dir)
        except ImportError:
            pass
        except Exception as err:  # the report is a view of the files above: never fail the run for it
            self.say(f"lit_probe: could not write report.html ({type(err).__name__}: {err}).")
