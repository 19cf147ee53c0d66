"""Command line: ``lit-probe demo``, ``lit-probe paths MODEL`` and ``lit-probe report SAVE_DIR`` and ``lit-probe diff RUN_A RUN_B`` (also
``python -m lit_probe ...``).

``demo`` trains the bundled :class:`~lit_probe.demo.DemoCNN`, with one of its injected bugs, under a
:class:`~lit_probe.FeatureProbe`, then prints what the probe found and where its files are::

    lit-probe demo --bug dead-relu --out ./lit_probe_demo
    lit-probe demo --bug exploding --steps 30 --wandb disabled

``paths`` lists the probe points (``named_modules`` paths and types) of a model, to pick ``probes=[...]``::

    lit-probe paths demo
    lit-probe paths resnet18 --depth 2
    lit-probe paths my_package.models:MyNet

``report`` writes ``SAVE_DIR/report.html``, one self-contained page of a run's findings and figures
(:func:`lit_probe.report.write_report`), and prints its path::

    lit-probe report lit_probe_demo/probe

``diff`` compares two runs' records step by step (:func:`lit_probe.diff.diff_runs`): the first step and the first
stream, in execution order, where they differ, per signal; how far it spread; streams in one run only. It prints
a short table and writes one self-contained page with the divergence figure (``--html``, default ``diff.html``)::

    lit-probe demo --out runs/a --wandb disabled
    lit-probe demo --out runs/b --wandb disabled --change gelu
    lit-probe diff runs/a runs/b

Arguments are parsed before torch or Lightning is imported, so ``--help`` and usage errors are quick.

Exit status: 0 when the command ran (findings or not), 2 for a usage error: bad arguments (argparse's usage
and error), or an output directory that cannot be created or written, or a SAVE_DIR that is not a directory
(one line on stderr, before a minute of training is spent). ``diff`` exits with 1 when the runs are not identical
(like ``diff``: a statistic differs, a stream or a step is in one run only).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

__all__ = ["main", "build_parser"]

_BUGS = ("none", "dead-relu", "exploding", "nan", "vanishing")  # lit_probe.demo.BUGS
_CHANGES = ("none", "gelu", "lr", "data-order")  # lit_probe.demo.CHANGES
#: ``lit_probe.demo.DEMO_STEPS``, repeated here so that parsing needs no torch (a test keeps them equal).
_DEMO_STEPS = 60
_MAX_TABLE_ROWS = 25


def _int_at_least(minimum: Optional[int]) -> Any:
    """An argparse ``type`` that accepts integers (>= ``minimum`` when given); bad values exit with status 2."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)
_int = _int_at_least(None)


def build_parser() -> argparse.ArgumentParser:
    """The ``lit-probe`` argument parser (imports nothing heavy)."""
    parser = argparse.ArgumentParser(
        prog="lit-probe", description="See inside PyTorch Lightning training while it runs.",
        epilog="Run `lit-probe demo` first: it trains a small CNN with an injected bug and shows what the probe "
               "finds.")
    sub = parser.add_subparsers(dest="command", metavar="{demo,paths,report,diff}")
    sub.required = True

    demo = sub.add_parser(
        "demo", help="train the demo CNN with an injected bug under FeatureProbe and print the findings",
        description="Train lit_probe.demo.DemoCNN on synthetic shapes with an injected bug under FeatureProbe, "
                    "then print the findings, one line of advice per kind, and where the files are.")
    demo.add_argument("--bug", choices=_BUGS, default="none", help="the bug to inject (default: %(default)s)")
    demo.add_argument("--out", type=Path, default=Path("lit_probe_demo"),
                      help="output directory: figures, summary.md, logs, the W&B run (default: ./%(default)s)")
    demo.add_argument("--steps", type=_positive_int, default=_DEMO_STEPS,
                      help="training steps, >= 1 (default: %(default)s; every bug shows within it)")
    demo.add_argument("--wandb", choices=("offline", "online", "disabled"), default="offline",
                      help="W&B logging; offline needs no network or account (default: %(default)s)")
    demo.add_argument("--mode", choices=("overwrite", "versioned"), default="overwrite",
                      help="figure files: one per layer and figure, or one per figure step (default: %(default)s)")
    demo.add_argument("--seed", type=_int, default=0, help="seed of weights, data and shuffling (default: 0)")
    demo.add_argument("--figure-every", type=_non_negative_int, default=None, metavar="N",
                      help="draw figures every N steps; 0: no figures (default: about 3 figure steps per run)")
    demo.add_argument("--no-progress-bar", action="store_true", help="hide Lightning's progress bar")
    demo.add_argument("--change", choices=_CHANGES, default="none",
                      help="a change that makes this run differ from the default one, for `lit-probe diff`: gelu "
                           "(block2's ReLU becomes a GELU), lr (the head learns at 10x the rate), data-order (another "
                           "shuffle) (default: %(default)s)")

    paths = sub.add_parser(
        "paths", help="list the probe points (module paths and types) of a model",
        description="List the module paths FeatureProbe(probes=[...]) accepts, with their types.")
    paths.add_argument("model", metavar="MODEL",
                       help="'demo', a torchvision model name (e.g. resnet18; built with weights=None), or "
                            "'module.path:ClassName' (built with no arguments)")
    paths.add_argument("--depth", type=_positive_int, default=None, metavar="N",
                       help="only paths with at most N dotted segments")

    report = sub.add_parser(
        "report", help="write SAVE_DIR/report.html: one self-contained page of a run's findings and figures",
        description="Write SAVE_DIR/report.html from the run record a probed run left in its save dir (run.json "
                    "and the figures it lists): incidents and findings first, the health timeline, each finding's "
                    "figures before and after, every layer's latest figures. Images are inlined: the file opens "
                    "from disk, with no network access. Prints the report's path.")
    report.add_argument("save_dir", metavar="SAVE_DIR", type=Path,
                        help="the probe's save dir (FeatureProbe(save_dir=...); by default "
                             "<default_root_dir>/probe); a demo's --out directory works too")
    report.add_argument("--title", default=None, help="the page title (default: 'lit-probe report: <dir name>')")

    diff = sub.add_parser(
        "diff", help="where two runs first differ: step, stream and signal, from their per-step statistics",
        description="Compare two probed runs step by step (their save dirs, or a demo's --out): per signal "
                    "(activation, gradient, parameter) the first step and the first stream in execution order "
                    "where a statistic differs beyond the tolerance (exact by default), how far the difference "
                    "spread, and the streams in one run only. Prints a table; writes a self-contained HTML page "
                    "with the divergence figure. Exit status 0 when identical, 1 when they are not (like diff).")
    diff.add_argument("run_a", metavar="RUN_A", type=Path, help="the first run's save dir")
    diff.add_argument("run_b", metavar="RUN_B", type=Path, help="the second run's save dir")
    diff.add_argument("--rtol", type=float, default=0.0,
                      help="relative tolerance, for runs that are not bit-identical (default: 0, exact)")
    diff.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default: 0)")
    diff.add_argument("--html", type=Path, default=Path("diff.html"), metavar="PATH",
                      help="the page to write (default: ./%(default)s); '-' for none")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``lit-probe`` / ``python -m lit_probe``; returns the exit status (argparse errors raise
    ``SystemExit(2)``)."""
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    if args.command == "demo":
        return _demo(args)
    if args.command == "report":
        return _report(args)
    if args.command == "diff":
        return _diff(args)
    return _paths(args, parser)


def _error(command: str, message: str) -> int:
    """One line on stderr, like argparse's own errors; returns the usage-error status 2."""
    print(f"lit-probe {command}: error: {message}", file=sys.stderr)
    return 2


def _writable_dir_problem(path: Path) -> Optional[str]:
    """``None`` when ``path`` is, or has just been made, a writable directory; else why not, in a few words."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return "it exists and is not a directory"
    except OSError as err:
        return f"cannot create it: {err.strerror or err}"
    try:
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".lit-probe-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        return f"cannot write in it: {err.strerror or err}"
    return None


# ---------------------------------------------------------------------------------------------------- demo
def _demo(args: argparse.Namespace) -> int:
    out: Path = args.out
    problem = _writable_dir_problem(out)  # before torch is imported, and before a minute of training
    if problem is not None:
        return _error("demo", f"--out {out}: {problem}")

    from .demo import DEMO_STEPS, EXPECTED, run_demo

    findings = run_demo(out, steps=args.steps, bug=args.bug, wandb=args.wandb, mode=args.mode, seed=args.seed,
                        figure_every_n_steps=args.figure_every, progress_bar=not args.no_progress_bar,
                        change=args.change)
    print()
    changed = f", change={args.change!r}" if args.change != "none" else ""
    print(f"lit-probe demo: bug={args.bug!r}{changed}, {args.steps} steps, seed {args.seed}")
    print()
    print(format_findings(findings))
    expected = EXPECTED.get(args.bug)
    if expected is not None:
        layer, signal, kind = expected
        causes = [f for f in findings if f.cause] or list(findings[:1])
        first = causes[0] if causes else None
        if first is not None and (first.layer, first.signal, first.kind) == expected:
            print(f"\nThe injected bug ({args.bug}) shows as expected, as the first incident: {kind} {signal} at "
                  f"`{layer}`, from step {first.step}.")
        elif any((f.layer, f.signal, f.kind) == expected for f in findings):
            print(f"\nThe injected bug ({args.bug}) was found ({kind} {signal} at `{layer}`), but not as the first "
                  f"incident: the first is {first.kind} {first.signal} at `{first.layer}`, step {first.step}.")
        else:
            print(f"\nThe injected bug ({args.bug}) shows as {kind} {signal} at `{layer}`, which this run did not "
                  f"reach; run more --steps (the default, {DEMO_STEPS}, shows every bug).")
    print()
    print(_where(out, args.wandb))
    report = _demo_report(out / "probe")
    if report is not None:
        print(f"\nReport: {report}  (one self-contained page: open it in a browser)")
    return 0


def _demo_report(save_dir: Path) -> Optional[Path]:
    """The demo's ``report.html``: the one fit end wrote, else written now; ``None`` when it cannot be."""
    path = save_dir / "report.html"
    if path.is_file():
        return path
    from .report import write_report

    try:
        return write_report(save_dir)
    except OSError as err:
        print(f"(no report: {err})")
        return None


# ---------------------------------------------------------------------------------------------------- report
def _report(args: argparse.Namespace) -> int:
    from .record import RECORD_NAME

    save_dir: Path = args.save_dir
    if not save_dir.is_dir():
        what = "does not exist" if not save_dir.exists() else "is not a directory"
        return _error("report", f"SAVE_DIR {save_dir} {what}")
    if not (save_dir / RECORD_NAME).exists() and (save_dir / "probe" / RECORD_NAME).exists():
        save_dir = save_dir / "probe"  # a demo's --out, or a trainer's default_root_dir
    if not (save_dir / RECORD_NAME).exists():
        return _error("report", f"no {RECORD_NAME} (the run record) in {save_dir}: not a lit-probe save directory")
    from .report import write_report

    try:
        path = write_report(save_dir, title=args.title)
    except OSError as err:
        return _error("report", f"cannot write {save_dir / 'report.html'}: {err.strerror or err}")
    print(path)
    return 0


# ---------------------------------------------------------------------------------------------------- diff
def _diff(args: argparse.Namespace) -> int:
    if args.rtol < 0 or args.atol < 0:
        return _error("diff", "--rtol and --atol must be >= 0")
    for p in (args.run_a, args.run_b):
        if not p.is_dir():
            return _error("diff", f"{p} {'does not exist' if not p.exists() else 'is not a directory'}")
    from .diff import diff_runs, write_diff_html

    try:
        result = diff_runs(args.run_a, args.run_b, rtol=args.rtol, atol=args.atol)
    except (FileNotFoundError, ValueError) as err:
        return _error("diff", str(err))
    try:
        print(result.to_text())
        sys.stdout.flush()
    except BrokenPipeError:  # `lit-probe diff A B | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if str(args.html) != "-":
        try:
            path = write_diff_html(result, args.html, title=f"lit-probe diff: {args.run_a} vs {args.run_b}")
        except OSError as err:
            return _error("diff", f"cannot write {args.html}: {err.strerror or err}")
        print(f"\nPage: {path}  (the divergence figure; one self-contained file)")
    return 0 if result.identical else 1


def format_findings(findings: Sequence[Any], max_rows: int = _MAX_TABLE_ROWS) -> str:
    """A plain-text table of findings (layer, signal, kind, step, value, threshold) and one line of advice
    per finding kind; says so when there are none."""
    from .findings import ADVICE, KINDS

    if not findings:
        return "No findings: every probed layer stayed within the thresholds."
    lines: list[str] = []
    causes = [f for f in findings if getattr(f, "cause", False)]
    if causes:  # incidents first: one root cause per line, then every finding grouped under its incident
        lines.append(f"Incidents ({len(causes)}), root cause first:")
        for f in causes:
            later = sorted({g.layer for g in findings if g.incident == f.incident and g is not f} - {f.layer})
            reached = f"; then {len(later)} more layer(s): {', '.join(later[:4])}" if later else ""
            lines.append(f"  #{f.incident}  step {f.step}  {f.kind} {f.signal} at {f.layer}{reached}")
        lines.append("")
        findings = sorted(findings, key=lambda f: (f.incident, not f.cause, f.step))
    head = ("layer", "signal", "kind", "step", "value", "threshold")
    rows = [(f.layer, f.signal, f.kind, str(f.step), f"{f.value:.4g}", f"{f.threshold:.4g}")
            for f in findings[:max_rows]]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    right = {3, 4, 5}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines += [f"Findings ({len(findings)}):", line(head), line(["-" * w for w in widths])]
    lines += [line(r) for r in rows]
    if len(findings) > max_rows:
        lines.append(f"... and {len(findings) - max_rows} more (see summary.md / findings.jsonl)")
    lines += ["", "What to do:"]
    kinds = [k for k in KINDS if any(f.kind == k for f in findings)]
    kinds += sorted({f.kind for f in findings} - set(kinds))
    lines += [f"  {k}: {ADVICE.get(k, '')}" for k in kinds]
    return "\n".join(lines)


def _where(out: Path, wandb: str) -> str:
    probe = out / "probe"
    figures = sorted(probe.glob("*/*.png"))
    lines = ["Files:"]
    if figures:
        layers = sorted({p.parent.name for p in figures})
        example = next((p for p in figures if p.parent.name != "_all"), figures[0])
        lines.append(f"  {'figures':<15}{probe}/<layer>/<figure>.png  ({len(figures)} files, {len(layers)} "
                     f"folders, e.g. {example})")
    else:
        lines.append(f"  {'figures':<15}none drawn (see --figure-every); would be in {probe}/<layer>/")
    for name in ("run.json", "summary.md", "findings.jsonl", "stats.bin"):
        if (probe / name).exists() or name != "stats.bin":
            lines.append(f"  {name:<15}{probe / name}")
    lines.append(f"  {'CSV logs':<15}{out / 'csv'}")
    if (out / "tensorboard").is_dir():
        lines.append(f"  {'TensorBoard':<15}{out / 'tensorboard'}  (tensorboard --logdir {out / 'tensorboard'})")
    runs = sorted((out / "wandb").glob("offline-run-*" if wandb == "offline" else "run-*"),
                  key=lambda p: p.stat().st_mtime)
    if wandb == "offline":
        if runs:
            lines.append(f"  {'W&B (offline)':<15}{runs[-1]}  (upload later: wandb sync {runs[-1]})")
        else:
            lines.append(f"  {'W&B (offline)':<15}no run directory found under {out / 'wandb'}")
    elif wandb == "online":
        lines.append(f"  {'W&B (online)':<15}{runs[-1] if runs else out / 'wandb'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- paths
def _build_model(spec: str, parser: argparse.ArgumentParser) -> Any:
    if spec == "demo":
        from .demo import DemoCNN

        return DemoCNN()
    if ":" in spec:
        mod_name, _, cls_name = spec.partition(":")
        try:
            obj: Any = importlib.import_module(mod_name)
            for part in cls_name.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as err:
            parser.error(f"cannot import MODEL {spec!r}: {type(err).__name__}: {err}")
        try:
            return obj()
        except Exception as err:
            parser.error(f"cannot build {spec} with no arguments: {type(err).__name__}: {err}")
    try:
        import torchvision
    except ImportError:  # pragma: no cover - torchvision is a dependency
        parser.error(f"MODEL {spec!r}: torchvision is not installed; give 'demo' or 'module.path:ClassName'")
    names = torchvision.models.list_models()
    if spec not in names:
        import difflib

        close = difflib.get_close_matches(spec, names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        parser.error(f"unknown MODEL {spec!r}: not 'demo', a torchvision model name, or 'module.path:ClassName'."
                     f"{hint}")
    return torchvision.models.get_model(spec, weights=None)


def _paths(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from torch import nn

    from .selection import list_probe_points

    model = _build_model(args.model, parser)
    if not isinstance(model, nn.Module):
        parser.error(f"MODEL {args.model!r} built a {type(model).__name__}, not a torch.nn.Module")
    points = list_probe_points(model, max_depth=args.depth)
    width = max((len(p) for p, _ in points), default=0)
    try:
        for path, type_name in points:
            print(f"{path.ljust(width)}  {type_name}")
        sys.stdout.flush()
    except BrokenPipeError:  # `lit-probe paths resnet50 | head`
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
