"""Selection
=========

Turns probe declarations into modules. The grammar, one string per declaration:

``"layer2.0.conv1"``
    an exact dotted path from ``named_modules()`` (relative to the model given).
``"layer3.*"``, ``"enc.*.attn"``, ``"**.conv1"``
    a glob matched segment by segment: ``*`` (and ``?``, ``[ab]``) stay inside one dotted segment, ``**``
    spans any number of segments. ``"layer3.*"`` is the direct children of ``layer3``; ``"net.**"`` every
    module under ``net`` (not ``net`` itself).
``"type:ReLU"``, ``"type:torch.nn.Conv2d"``
    every module of that class (or a subclass), by class name or qualified name.
``"re:^enc\\.\\d+$"``
    every path the regular expression matches (``re.search``).

Wrapper segments that are not the user's names (``_orig_mod`` of ``torch.compile``,
``_checkpoint_wrapped_module``, ``_fsdp_wrapped_module``) are removed from the names, so a path is the
same with and without those wrappers.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Sequence

from torch import nn

from .errors import ProbeConfigError, ProbeSelectionError

__all__ = ["resolve", "validate_patterns", "list_probe_points", "canonical_name", "named_modules"]

_WRAPPER_SEGMENTS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")


def canonical_name(name: str) -> str:
    """The user's dotted name: wrapper segments (``_orig_mod``, ...) removed."""
    if not any(seg in name for seg in _WRAPPER_SEGMENTS):
        return name
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_SEGMENTS)


def named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` with canonical names, the root excluded, each module once."""
    out: list[tuple[str, nn.Module]] = []
    seen_names: set[str] = set()
    for name, module in model.named_modules():
        cname = canonical_name(name)
        if not cname or cname in seen_names:  # the root, or a wrapper and what it wraps
            continue
        # a wrapper (OptimizedModule, checkpoint wrapper) and the module it wraps share a canonical name: keep
        # the innermost, whose forward actually runs the layers
        seen_names.add(cname)
        out.append((cname, module))
    # replace wrappers by the module they wrap
    fixed = []
    for cname, module in out:
        inner = module
        for _ in range(4):
            nxt = getattr(inner, "_orig_mod", None) or getattr(inner, "_checkpoint_wrapped_module", None)
            if not isinstance(nxt, nn.Module):
                break
            inner = nxt
        fixed.append((cname, inner))
    return fixed


def _kind(pattern: str) -> str:
    if pattern.startswith("type:"):
        return "type"
    if pattern.startswith("re:"):
        return "regex"
    if any(c in pattern for c in "*?["):
        return "glob"
    return "path"


def validate_patterns(patterns: Iterable[str], what: str = "probes") -> list[str]:
    """Check the syntax of probe declarations without a model (used in ``__init__``)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        if not isinstance(p, str):
            raise ProbeConfigError(f"`{what}` must be a list of strings, got {type(p).__name__}: {p!r}.")
        p = p.strip()
        if not p:
            raise ProbeConfigError(f"`{what}` contains an empty string; give a module path such as 'layer1'.")
        kind = _kind(p)
        if kind == "regex":
            try:
                re.compile(p[3:])
            except re.error as err:
                raise ProbeConfigError(f"Invalid regular expression in {what}: {p!r} ({err}).") from None
        elif kind == "type" and not p[5:].strip():
            raise ProbeConfigError(f"{p!r} names no type; write e.g. 'type:Conv2d'.")
        elif kind in ("path", "glob") and (p.startswith(".") or p.endswith(".") or ".." in p):
            raise ProbeConfigError(f"{p!r} is not a dotted module path (stray '.').")
        out.append(p)
    return out


def _glob_match(pattern: str, name: str) -> bool:
    pat = pattern.split(".")
    parts = name.split(".")

    def rec(i: int, j: int) -> bool:
        if i == len(pat):
            return j == len(parts)
        if pat[i] == "**":  # any number of segments; at the end at least one ("net.**": all under net)
            start = j + 1 if i == len(pat) - 1 else j
            return any(rec(i + 1, k) for k in range(start, len(parts) + 1))
        return j < len(parts) and fnmatch.fnmatchcase(parts[j], pat[i]) and rec(i + 1, j + 1)

    return rec(0, 0)


def _type_match(type_name: str, module: nn.Module) -> bool:
    for cls in type(module).__mro__:
        if cls.__name__ == type_name or f"{cls.__module__}.{cls.__qualname__}" == type_name:
            return True
    return False


def _close(query: str, names: Sequence[str], n: int = 5) -> list[str]:
    close = difflib.get_close_matches(query, names, n=n, cutoff=0.5)
    if len(close) < n:  # also the names that share the last segment, or start like the query
        last = query.split(".")[-1]
        close += [m for m in names if m.split(".")[-1] == last and m not in close][: n - len(close)]
    return close


def _top_level(names: Sequence[str], limit: int = 30) -> str:
    top = [n for n in names if "." not in n]
    s = ", ".join(f"'{n}'" for n in top[:limit])
    return s + (", ..." if len(top) > limit else "")


def resolve(model: nn.Module, patterns: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """Resolve probe declarations against ``model``.

    Returns:
        ``(name, module)`` pairs in the model's registration order (``named_modules()`` order), each once.

    Raises:
        ProbeSelectionError: a declaration matches no module; the message names the closest real paths.
    """
    modules = named_modules(model)
    names = [n for n, _ in modules]
    selected: set[str] = set()
    for p in validate_patterns(patterns):
        kind = _kind(p)
        if kind == "path":
            hit = [p] if p in names else []
        elif kind == "glob":
            hit = [n for n in names if _glob_match(p, n)]
        elif kind == "regex":
            rx = re.compile(p[3:])
            hit = [n for n in names if rx.search(n)]
        else:
            t = p[5:].strip()
            hit = [n for n, m in modules if _type_match(t, m)]
        if not hit:
            raise ProbeSelectionError(_no_match_message(p, kind, modules))
        selected.update(hit)
    return [(n, m) for n, m in modules if n in selected]


def _no_match_message(p: str, kind: str, modules: list[tuple[str, nn.Module]]) -> str:
    names = [n for n, _ in modules]
    model_hint = "Hint: `lit_probe.list_probe_points(model)` (or `python -m lit_probe paths`) lists every path."
    if not names:
        return f"Probe {p!r} matches nothing: the model has no submodules yet. {model_hint}"
    if kind == "type":
        types = sorted({type(m).__name__ for _, m in modules})
        close = difflib.get_close_matches(p[5:].strip(), types, n=5, cutoff=0.4)
        hint = f" Closest types: {', '.join(repr('type:' + c) for c in close)}." if close else ""
        return (f"Probe {p!r} matches no module.{hint} Types in the model: {', '.join(types[:40])}. {model_hint}")
    query = p[3:] if kind == "regex" else p
    query = query.replace("*", "").replace("?", "").strip("^$.\\") or query
    close = _close(query, names)
    what = {"path": "is not a module of the model", "glob": "(a glob) matches no module",
            "regex": "(a regular expression) matches no module"}[kind]
    msg = f"Probe {p!r} {what}."
    if close:
        msg += " Closest real paths: " + ", ".join(f"'{c}'" for c in close) + "."
    msg += f" Top-level modules: {_top_level(names)}. {model_hint}"
    return msg


def list_probe_points(model: nn.Module, max_depth: int | None = None) -> list[tuple[str, str]]:
    """Every probe-able path of ``model`` with its module type, in registration order.

    Args:
        model: any ``nn.Module`` (a LightningModule included).
        max_depth: only paths with at most this many dotted segments.
    """
    out = []
    for n, m in named_modules(model):
        if max_depth is None or n.count(".") < max_depth:
            out.append((n, type(m).__name__))
    return out


def no_probes_message(model: nn.Module) -> str:
    names = [n for n, _ in named_modules(model)]
    return ("FeatureProbe has nothing to probe: give `FeatureProbe(probes=[...])`, or declare `probe_points` "
            "(or `configure_probes()`) on the LightningModule through `ProbeMixin`. "
            f"Top-level modules of {type(model).__name__}: {_top_level(names) or '(none)'}; "
            "globs like 'layer3.*' and selectors like 'type:Conv2d' work too.")


def check_thresholds_keys(given: Iterable[str], known: Iterable[str]) -> None:
    known = list(known)
    for k in given:
        if k not in known:
            close = difflib.get_close_matches(k, known, n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ProbeConfigError(f"Unknown threshold {k!r}.{hint} Known thresholds: {', '.join(known)}.")
