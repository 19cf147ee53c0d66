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
ADAPTERS = {"callback", "lightning", "pytorch_lightning", "packages", "trainer"}  # the only modules that may import Lightning...
LEAVES = {"demo", "__main__"}  # ...besides leaves nothing imports
# what each core module may import from lit_probe (down the pipeline only)
ALLOWED = {
    "errors": set(), "vocab": set(), "findings": set(), "selection": {"errors"},
    "stats": set(), "hooks": set(), "params": {"stats"}, "snapshots": {"vocab"}, "history": {"stats"},
    "diagnose": {"findings", "history", "selection", "errors"},
    "session": {"diagnose", "findings", "history", "hooks", "params", "selection", "stats", "vocab", "snapshots"},
    "mixin": set(), "extract": {"selection", "errors", "hooks"}, "gradcam": {"selection", "errors"},
    "figures": set(), "render": {"figures"}, "sinks": set(), "report": {"findings", "sinks"},
    "output": {"findings", "sinks", "render", "report"},
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
