"""`lit-probe demo` and `lit-probe paths`, run in-process through `lit_probe.__main__.main`.

Step counts: the smallest that show each bug with the demo's seeds (+1 step of margin). Measured minima:
exploding 7 (block3.conv passes 1e6 at step 6), nan 2 (`bug_step` is half of a run shorter than 30 steps),
vanishing 5 (the median needs 5 measured steps), dead-relu 21 (the 20-step window, then the end-of-fit flush).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lit_probe.__main__ import format_findings, main
from lit_probe.demo import EXPECTED, demo_bug_step
from lit_probe.findings import ADVICE, Finding
from lit_probe.record import RunRecord

STEPS = {"none": 22, "dead-relu": 22, "exploding": 8, "nan": 3, "vanishing": 6}

pytestmark = pytest.mark.filterwarnings("ignore::lit_probe.callback.ProbeWarning")


def _findings(out: Path) -> list[dict]:
    text = (out / "probe" / "findings.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("bug", list(STEPS))
def test_demo_reports_the_injected_bug(bug, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["demo", "--bug", bug, "--steps", str(STEPS[bug]), "--wandb", "disabled", "--out", str(out),
               "--figure-every", "0", "--no-progress-bar"])
    assert rc == 0
    text = capsys.readouterr().out
    rows = _findings(out)
    assert (out / "probe" / "summary.md").is_file()
    assert str(out / "probe" / "summary.md") in text
    assert f"Report: {out / 'probe' / 'report.html'}" in text and (out / "probe" / "report.html").is_file()
    if bug == "none":
        assert rows == []
        assert "No findings" in text
        assert "What to do" not in text
        return
    layer, signal, kind = EXPECTED[bug]
    got = [(r["layer"], r["signal"], r["kind"]) for r in rows]
    assert (layer, signal, kind) in got, got
    # the expected finding is the first of its kind and signal (for "exploding" a gradient's growth rule may
    # fire a step earlier, at block2.act; the activation that passes 1e6 first is block3.conv)
    first = next(r for r in rows if (r["kind"], r["signal"]) == (kind, signal))
    assert (first["layer"], first["signal"], first["kind"]) == (layer, signal, kind)
    if bug == "nan":
        assert first["step"] == demo_bug_step(STEPS[bug])
        assert rows[0]["layer"] == layer  # the very first finding: where NaN/Inf appeared
    # the printed table has the row and one line of advice per kind
    assert any(line.split()[:3] == [layer, signal, kind] for line in text.splitlines()), text
    assert f"  {kind}: {ADVICE[kind]}" in text
    assert "shows as expected" in text


def test_demo_offline_wandb_figures_and_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    env_before = dict(os.environ)
    out = tmp_path / "out"
    rc = main(["demo", "--bug", "nan", "--steps", "3", "--wandb", "offline", "--mode", "versioned",
               "--figure-every", "3", "--out", str(out)])
    assert rc == 0
    assert dict(os.environ) == env_before  # WANDB_MODE and friends restored
    text = capsys.readouterr().out
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list(out.rglob("*"))[:20]
    assert any(runs[0].glob("*.wandb"))
    assert str(runs[0]) in text
    pngs = list((out / "probe").glob("*/*_step000000.png"))  # versioned names, the figure step 0
    assert pngs
    assert (out / "probe" / "block3.norm_div").is_dir()
    assert (out / "csv").is_dir()
    assert [r["kind"] for r in _findings(out)][:1] == ["nonfinite"]
    assert "figures" in text and str(out / "probe") in text


@pytest.mark.parametrize("argv", [
    ["demo", "--steps", "0"],
    ["demo", "--steps", "-3"],
    ["demo", "--steps", "many"],
    ["demo", "--bug", "sleepy"],
    ["demo", "--wandb", "maybe"],
    ["demo", "--mode", "append"],
    ["demo", "--figure-every", "-1"],
    ["paths"],
    ["paths", "resnet19"],
    ["paths", "demo", "--depth", "0"],
    ["paths", "torch.nn:NoSuchModule"],
    ["paths", "torch.nn:Linear"],  # needs arguments
    ["paths", "lit_probe.findings:ADVICE"],  # not a class
    ["frobnicate"],
    [],
])
def test_bad_arguments_exit_2(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err
    assert not list(tmp_path.iterdir())  # nothing ran


def test_bad_steps_message(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--steps", "0"])
    assert "--steps: must be >= 1, got 0" in capsys.readouterr().err


def test_paths_demo_and_torchvision(capsys):
    assert main(["paths", "demo"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = {line.split()[0]: line.split()[1] for line in lines}
    assert table["block2.act"] == "ReLU" and table["head"] == "Linear" and table["block3.norm_div"] == "NormDiv"
    assert main(["paths", "resnet18", "--depth", "1"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]
    assert main(["paths", "lit_probe.demo:DemoCNN", "--depth", "1"]) == 0
    assert "block3  Sequential" in capsys.readouterr().out


def test_python_dash_m(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "lit_probe", "paths", "demo", "--depth", "1"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[:2] == ["stem", "Sequential"]


def test_format_findings():
    assert format_findings([]).startswith("No findings")
    f = Finding(step=3, layer="block2.act", signal="activation", kind="dead", value=1.0, threshold=0.5)
    text = format_findings([f] * 30, max_rows=5)
    assert "Findings (30):" in text and "... and 25 more" in text
    assert text.count(ADVICE["dead"]) == 1


# ---------------------------------------------------------------------------------------------- issue 11
_HEAVY = ("torch", "pytorch_lightning", "lightning", "matplotlib", "wandb", "lit_probe.demo")
# `python -m lit_probe ARGV` for several ARGV in one interpreter; prints, last, the exit codes and which heavy
# modules the package import alone loaded and which were loaded after all the commands
_IMPORTS_SCRIPT = """
import json, runpy, sys
HEAVY = {heavy!r}
import lit_probe
package = sorted(m for m in HEAVY if m in sys.modules)
codes = []
for argv in {argvs!r}:
    sys.argv = ["lit-probe", *argv]
    try:
        runpy.run_module("lit_probe", run_name="__main__", alter_sys=True)
        codes.append(0)
    except SystemExit as exc:
        codes.append(exc.code)
print(json.dumps({{"codes": codes, "package": package, "after": sorted(m for m in HEAVY if m in sys.modules)}}))
"""


def test_parsing_imports_neither_torch_nor_lightning(tmp_path):
    """`lit-probe --help`, `demo --help`, bad arguments and an unusable --out import no torch/Lightning."""
    (tmp_path / "file").write_text("x")
    argvs = [["--help"], ["demo", "--help"], ["report", "--help"], ["demo", "--steps", "0"], ["frobnicate"],
             ["demo", "--out", str(tmp_path / "file" / "sub"), "--wandb", "disabled"],
             ["report", str(tmp_path / "nope")]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", _IMPORTS_SCRIPT.format(heavy=_HEAVY, argvs=argvs)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["codes"] == [0, 0, 0, 2, 2, 2, 2], res.stderr
    assert "usage: lit-probe demo" in res.stdout and "SAVE_DIR" in res.stdout
    # the command line itself imports nothing heavy: all of it comes from `import lit_probe` (if anything)
    assert set(got["after"]) == set(got["package"]), got
    if "torch" in got["package"]:
        pytest.xfail("`import lit_probe` (lit_probe/__init__.py) imports torch eagerly; the CLI itself does not")
    assert got["after"] == []


def test_demo_steps_default_matches_the_demo():
    from lit_probe.__main__ import _DEMO_STEPS
    from lit_probe.demo import DEMO_STEPS

    assert _DEMO_STEPS == DEMO_STEPS


@pytest.mark.parametrize("where", ["file", "under-file", "proc"])
def test_demo_unusable_out_is_one_line_exit_2(where, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = {"file": tmp_path / "file", "under-file": tmp_path / "file" / "a" / "b", "proc": Path("/proc/lit-probe-x")}
    if where == "proc" and not Path("/proc/self").is_dir():
        pytest.skip("no /proc")
    assert main(["demo", "--out", str(out[where]), "--wandb", "disabled"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lit-probe demo: error: --out {out[where]}: "), captured.err
    assert "Traceback" not in captured.err


def test_report_command(tmp_path, capsys):
    probe = tmp_path / "run" / "probe"
    probe.mkdir(parents=True)
    f = Finding(step=7, layer="block3.norm_div", signal="activation", kind="nonfinite", value=float("nan"),
                threshold=0.0, incident=0, cause=True)
    record = RunRecord(layers=["block3.norm_div"], status="finished")
    record.set_findings([f])
    record.save(probe)
    assert main(["report", str(probe), "--title", "my run"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str((probe / "report.html").resolve())
    page = (probe / "report.html").read_text()
    assert "<title>my run</title>" in page and "block3.norm_div" in page
    # a demo's --out (the probe's files one level down) works too
    (probe / "report.html").unlink()
    assert main(["report", str(tmp_path / "run")]) == 0
    assert (probe / "report.html").is_file()
    capsys.readouterr()
    for bad in (tmp_path / "nope", probe / "run.json"):
        assert main(["report", str(bad)]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"lit-probe report: error: SAVE_DIR {bad} "), err
    assert main(["report", str(tmp_path)]) == 2  # a directory without a run record
    assert "no run.json (the run record)" in capsys.readouterr().err
