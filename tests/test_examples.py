"""Every example runs with its smallest settings, writes only under the directory it is given, and says how
to run it in its docstring."""

from __future__ import annotations

import ast
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CONFIGS = REPO / "configs"

pytestmark = [pytest.mark.filterwarnings("ignore::lit_probe.callback.ProbeWarning"),
              pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")]


def _small_args(tmp_path: Path) -> dict[str, list[str]]:
    return {
        "plain_callback.py": ["--out", str(tmp_path / "out"), "--steps", "22"],
        "plain_loop.py": ["--out", str(tmp_path / "out"), "--steps", "22"],
        "fabric_loop.py": ["--out", str(tmp_path / "out"), "--steps", "8"],
        "features_and_gradcam.py": ["--out", str(tmp_path / "out"), "--images", "2"],
        "mixin_resnet.py": ["--out", str(tmp_path / "out"), "--steps", "3", "--batch-size", "8"],
        "train_cli.py": ["fit", "--config", str(CONFIGS / "demo.yaml"), "--config", str(CONFIGS / "probe.yaml"),
                         "--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path / 'out'}",
                         "--trainer.enable_progress_bar=false",
                         "--trainer.callbacks.init_args.figures=[timeline]"],
    }


_ARTIFACTS = ("lit_probe_runs", "lightning_logs", "wandb/", "probe/", ".png", ".csv", ".ckpt", "summary.md",
              "findings.jsonl", "events.out.tfevents")


def _repo_files() -> set[str]:
    """Run artifacts in the repository (other files may change while the tests run: other people work here)."""
    res = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--ignored", "--", "."],
                         cwd=REPO, capture_output=True, text=True, timeout=30)
    return {line for line in res.stdout.splitlines() if any(a in line for a in _ARTIFACTS)}


def _examples() -> list[str]:
    return sorted(p.name for p in EXAMPLES.glob("[!_]*.py"))


@pytest.mark.parametrize("name", _examples())
def test_example_docstring_says_how_to_run(name):
    doc = ast.get_docstring(ast.parse((EXAMPLES / name).read_text()))
    assert doc and "To run:" in doc, name


@pytest.mark.parametrize("name", sorted(_small_args(Path("."))))
def test_example_runs_and_writes_only_under_its_directory(name, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "cwd"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *_small_args(tmp_path)[name]])
    before = _repo_files()
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    out = tmp_path / "out"
    expected = out / ("gradcam.png" if name == "features_and_gradcam.py" else "probe/summary.md")
    assert expected.is_file(), sorted(map(str, tmp_path.rglob("*")))[:30]
    assert not list(run_dir.iterdir()), list(run_dir.iterdir())  # nothing outside --out
    assert _repo_files() <= before
    text = capsys.readouterr().out
    if name == "plain_callback.py":
        assert "block2.act" in text and "dead" in text  # the demo's dead ReLU, after its 20-step window
    if name == "features_and_gradcam.py":
        assert "layer1.0.relu ran 2 times" in text
    if name == "plain_loop.py":
        assert "incident: dead activation at 3, step 2" in text  # step 20 or 21: the 20-step window, then a read
    if name == "fabric_loop.py":
        assert "incident: nonfinite activation at 2, step 5" in text
    if name == "mixin_resnet.py":
        assert "probed: backbone.layer1, backbone.layer4.0, backbone.layer4.1" in text
