"""The dependency rule of DESIGN.md: the core imports neither Lightning nor wandb; only sinks touches wandb."""

from __future__ import annotations

import subprocess
import sys

import pytest

CORE = ["selection", "stats", "history", "diagnose", "findings", "errors", "figures", "session", "hooks",
        "snapshots", "render", "sinks", "mixin", "extract", "gradcam"]


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_without_lightning_and_wandb(module):
    code = (
        "import sys\n"
        "for name in ('lightning', 'pytorch_lightning', 'lightning_fabric', 'wandb'):\n"
        "    sys.modules[name] = None\n"
        f"import lit_probe.{module}\n"
        "import lit_probe\n"
        "assert 'pytorch_lightning' not in [k for k, v in sys.modules.items() if v is not None]\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_public_api():
    import lit_probe

    for name in ("FeatureProbe", "ProbeMixin", "Finding", "ProbeConfigError", "ProbeAlarm", "ProbeSession",
                 "list_probe_points", "Severity", "__version__"):
        assert hasattr(lit_probe, name), name
    assert set(lit_probe.__all__) >= {"FeatureProbe", "ProbeMixin", "Finding", "ProbeConfigError", "ProbeAlarm"}
