"""The dependency rule, read from the source (AST: lazy imports inside functions count too), and checked by
importing the core with Lightning and wandb blocked.

Data flows one way: vocabulary -> measurement (stats, hooks) -> history -> detectors -> session -> output; the
callback maps Lightning's lifecycle onto the session and the output. Only the adapters touch Lightning, only the
sinks (and the demo, a leaf) touch wandb, and nothing in the core imports the callback or the output.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "lit_probe"
LIGHTNING = {"lightning", "pytorch_lightning", "lightning_fabric"}
ADAPTERS = {"callback", "lightning", "pytorch_lightning", "packages", "trainer", "fabric"}  # the only modules that may import Lightning...
LEAVES = {"demo", "__main__"}  # ...besides leaves nothing imports
# what each core module may import from lit_probe (down the pipeline only)
ALLOWED = {
    "errors": set(), "vocab": set(), "findings": {"vocab"}, "selection": {"errors"},
    "stats": set(), "hooks": set(), "params": {"stats", "vocab"}, "snapshots": {"vocab"}, "history": {"stats"},
    "diagnose": {"findings", "history", "selection", "errors", "vocab"},
    "session": {"diagnose", "findings", "gradref", "history", "hooks", "params", "selection", "stats", "vocab",
                "snapshots"},
    "gradref": {"vocab"},
    "mixin": set(), "extract": {"selection", "errors", "hooks"}, "gradcam": {"selection", "errors"},
    "figures": set(), "compose": {"figures", "vocab"}, "drawing": {"compose", "figures"},
    "render": {"compose", "drawing", "figures", "vocab"}, "sinks": set(), "record": {"findings", "sinks"},
    "report": {"findings", "record", "sinks", "vocab"},
    "output": {"config", "findings", "record", "sinks", "render", "report", "statlog"},
    "statlog": set(), "diff": {"record", "statlog", "sinks", "vocab"},
    "config": {"diagnose", "errors", "selection", "vocab"},
    "run": {"config", "errors", "findings", "gradcam", "hooks", "history", "mixin", "output", "record", "selection",
            "session", "vocab"},
}


def _imports(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (top level, functions, TYPE_CHECKING blocks)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: lit_probe.<module>
                base = node.module or ""
                out.update(f"lit_probe.{base or a.name}".rstrip(".") for a in node.names)
            elif node.module:
                out.add(node.module)
    return out


MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")


def test_every_module_is_classified():
    assert set(MODULES) == set(ALLOWED) | ADAPTERS | LEAVES, set(MODULES) ^ (set(ALLOWED) | ADAPTERS | LEAVES)


@pytest.mark.parametrize("module", MODULES)
def test_dependency_rule_in_the_source(module):
    found = _imports(PKG / f"{module}.py")
    tops = {m.split(".")[0] for m in found}
    if module not in ADAPTERS | LEAVES:
        assert not tops & LIGHTNING, f"{module} imports Lightning: {sorted(tops & LIGHTNING)}"
    if module not in {"sinks", "demo"}:
        assert "wandb" not in tops, f"{module} imports wandb (only sinks.py does, lazily)"
    ours = {m.split(".")[1] for m in found if m.startswith("lit_probe.") and m.count(".") >= 1}
    if module in ALLOWED:
        extra = ours - ALLOWED[module]
        assert not extra, f"{module} imports {sorted(extra)} from lit_probe: against the flow of data"


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_core_module_imports_without_lightning_and_wandb(module):
    code = (
        "import sys\n"
        "for name in ('lightning', 'pytorch_lightning', 'lightning_fabric', 'wandb'):\n"
        "    sys.modules[name] = None\n"
        f"import lit_probe.{module}\n"
        "import lit_probe\n"
        "assert not [k for k in ('lightning', 'pytorch_lightning') if sys.modules.get(k) is not None]\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_importing_lit_probe_imports_neither_torch_nor_lightning():
    code = ("import sys, lit_probe\n"
            "print(sorted(m for m in ('torch', 'lightning', 'pytorch_lightning', 'wandb', 'matplotlib') "
            "if m in sys.modules))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr


def test_public_api():
    import lit_probe

    for name in ("FeatureProbe", "ProbeMixin", "Finding", "Incident", "ProbeConfigError", "ProbeAlarm",
                 "ProbeSession", "list_probe_points", "Severity", "Thresholds", "__version__"):
        assert hasattr(lit_probe, name), name
    assert set(lit_probe.__all__) >= {"FeatureProbe", "ProbeMixin", "Finding", "ProbeConfigError", "ProbeAlarm"}


def _private_names_defined(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, classes, module globals, and attributes it assigns."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            out.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.add(node.target.id)
    return {n for n in out if n.startswith("_") and not n.startswith("__")}


def test_no_private_member_is_used_across_modules():
    """A module reads its own private members only: ``x._name`` where ``_name`` belongs to another lit_probe
    module (and to no module reading it) fails, as does ``from .mod import _name``. Private members of torch,
    Lightning and matplotlib that the probe must read are listed with their reason."""
    third_party = {  # name: why the probe reads it
        "_scale": "torch GradScaler's scale tensor (no host sync, unlike get_scale())",
        "_forward_hooks": "nn.Module hook dicts (hook snapshots, leak checks)",
        "_forward_pre_hooks": "nn.Module hook dicts", "_backward_hooks": "nn.Module hook dicts",
        "_backward_pre_hooks": "nn.Module hook dicts",
    }
    trees = {m: ast.parse((PKG / f"{m}.py").read_text()) for m in MODULES}
    owned = {m: _private_names_defined(t) for m, t in trees.items()}
    everyone = set().union(*owned.values())
    bad = []
    for m, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                bad += [f"{m}: from .{node.module} import {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
                continue
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls", "torch", "np"):
                continue  # its own, or a library's (torch._C, torch._foreach_norm)
            if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super":
                continue
            name = node.attr
            if name in owned[m] or name not in everyone or name in third_party:
                continue  # its own, or not ours (torch._C, torch._foreach_norm, ...)
            bad.append(f"{m}:{node.lineno}: .{name} (a private member of {sorted(k for k in owned if name in owned[k])})")
    assert not bad, "\n".join(bad)
