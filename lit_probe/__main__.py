"""Command line: ``lit-probe demo`` and ``lit-probe paths MODEL`` (also ``python -m lit_probe ...``).

``demo`` trains the bundled :class:`~lit_probe.demo.DemoCNN`, with one of its injected bugs, under a
:class:`~lit_probe.FeatureProbe`, then prints what the probe found and where its files are::

    lit-probe demo --bug dead-relu --out ./lit_probe_demo
    lit-probe demo --bug exploding --steps 30 --wandb disabled

``paths`` lists the probe points (``named_modules`` paths and types) of a model, to pick ``probes=[...]``::

    lit-probe paths demo
    lit-probe paths resnet18 --depth 2
    lit-probe paths my_package.models:MyNet

Exit status: 0 when the command ran (findings or not), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

__all__ = ["main", "build_parser"]

_BUGS = ("none", "dead-relu", "exploding", "nan", "vanishing")
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
    """The ``lit-probe`` argument parser."""
    from .demo import DEMO_STEPS

    parser = argparse.ArgumentParser(
        prog="lit-probe", description="See inside PyTorch Lightning training while it runs.",
        epilog="Run `lit-probe demo` first: it trains a small CNN with an injected bug and shows what the probe "
               "finds.")
    sub = parser.add_subparsers(dest="command", metavar="{demo,paths}")
    sub.required = True

    demo = sub.add_parser(
        "demo", help="train the demo CNN with an injected bug under FeatureProbe and print the findings",
        description="Train lit_probe.demo.DemoCNN on synthetic shapes with an injected bug under FeatureProbe, "
                    "then print the findings, one line of advice per kind, and where the files are.")
    demo.add_argument("--bug", choices=_BUGS, default="none", help="the bug to inject (default: %(default)s)")
    demo.add_argument("--out", type=Path, default=Path("lit_probe_demo"),
                      help="output directory: figures, summary.md, logs, the W&B run (default: ./%(default)s)")
    demo.add_argument("--steps", type=_positive_int, default=DEMO_STEPS,
                      help="training steps, >= 1 (default: %(default)s; every bug shows within it)")
    demo.add_argument("--wandb", choices=("offline", "online", "disabled"), default="offline",
                      help="W&B logging; offline needs no network or account (default: %(default)s)")
    demo.add_argument("--mode", choices=("overwrite", "versioned"), default="overwrite",
                      help="figure files: one per layer and figure, or one per figure step (default: %(default)s)")
    demo.add_argument("--seed", type=_int, default=0, help="seed of weights, data and shuffling (default: 0)")
    demo.add_argument("--figure-every", type=_non_negative_int, default=None, metavar="N",
                      help="draw figures every N steps; 0: no figures (default: about 3 figure steps per run)")
    demo.add_argument("--no-progress-bar", action="store_true", help="hide Lightning's progress bar")

    paths = sub.add_parser(
        "paths", help="list the probe points (module paths and types) of a model",
        description="List the module paths FeatureProbe(probes=[...]) accepts, with their types.")
    paths.add_argument("model", metavar="MODEL",
                       help="'demo', a torchvision model name (e.g. resnet18; built with weights=None), or "
                            "'module.path:ClassName' (built with no arguments)")
    paths.add_argument("--depth", type=_positive_int, default=None, metavar="N",
                       help="only paths with at most N dotted segments")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``lit-probe`` / ``python -m lit_probe``; returns the exit status (argparse errors raise
    ``SystemExit(2)``)."""
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    if args.command == "demo":
        return _demo(args)
    return _paths(args, parser)


# ---------------------------------------------------------------------------------------------------- demo
def _demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_STEPS, EXPECTED, run_demo

    out: Path = args.out
    findings = run_demo(out, steps=args.steps, bug=args.bug, wandb=args.wandb, mode=args.mode, seed=args.seed,
                        figure_every_n_steps=args.figure_every, progress_bar=not args.no_progress_bar)
    print()
    print(f"lit-probe demo: bug={args.bug!r}, {args.steps} steps, seed {args.seed}")
    print()
    print(format_findings(findings))
    expected = EXPECTED.get(args.bug)
    if expected is not None:
        layer, signal, kind = expected
        hit = [f for f in findings if (f.layer, f.signal, f.kind) == expected]
        if hit:
            print(f"\nThe injected bug ({args.bug}) shows as expected: {kind} {signal} at `{layer}`, "
                  f"from step {hit[0].step}.")
        else:
            print(f"\nThe injected bug ({args.bug}) shows as {kind} {signal} at `{layer}`, which this run did not "
                  f"reach; run more --steps (the default, {DEMO_STEPS}, shows every bug).")
    print()
    print(_where(out, args.wandb))
    return 0


def format_findings(findings: Sequence[Any], max_rows: int = _MAX_TABLE_ROWS) -> str:
    """A plain-text table of findings (layer, signal, kind, step, value, threshold) and one line of advice
    per finding kind; says so when there are none."""
    from .findings import ADVICE, KINDS

    if not findings:
        return "No findings: every probed layer stayed within the thresholds."
    head = ("layer", "signal", "kind", "step", "value", "threshold")
    rows = [(f.layer, f.signal, f.kind, str(f.step), f"{f.value:.4g}", f"{f.threshold:.4g}")
            for f in findings[:max_rows]]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    right = {3, 4, 5}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [f"Findings ({len(findings)}):", line(head), line(["-" * w for w in widths])]
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
    for name in ("summary.md", "findings.jsonl"):
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
