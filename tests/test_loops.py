"""One run core, four loops: the same injected bug (a division by zero in ``net.2`` at step 6, see ``loops.py``)
gives the same findings, files and report in a plain PyTorch loop, a Lightning Fabric loop (one process, and
Fabric DDP with 2 CPU processes), and a ``Trainer`` of either Lightning package.

Ground truth comes from plain PyTorch (:func:`oracle_first_nonfinite`: forward hooks of our own on every module),
never from the probe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import loops
from lit_probe import read_record

TESTS = Path(__file__).resolve().parent
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def oracle_first_nonfinite() -> tuple[int, str]:
    """(step, module path) of the first non-finite module output, in forward order, of the plain loop."""
    model = loops.Model()
    opt = loops.optimizer(model)
    seen: list[str] = []
    handles = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.append(name)
                                       if isinstance(out, torch.Tensor) and not torch.isfinite(out).all() else None)
               for name, m in model.named_modules() if name.startswith("net.")]
    try:
        for step, (x, y) in enumerate(loops.loader()):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if seen:
                return step, seen[0]
            loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        for h in handles:
            h.remove()
    raise AssertionError("the bug did not fire")


def first_incident(findings) -> tuple[int, str, str, str]:
    cause = next(f for f in findings if f.cause and f.incident == min(g.incident for g in findings))
    return cause.step, cause.layer, cause.signal, cause.kind


def summary(findings) -> list[tuple[int, str, str, str]]:
    return sorted((f.step, f.layer, f.signal, f.kind) for f in findings)


def check_files(out: Path, cause_layer: str) -> set[str]:
    """The probe's files are complete and say the same; returns the relative file names."""
    record = read_record(out)
    assert record.status == "finished"
    names = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {"run.json", "findings.jsonl", "summary.md", "report.html"} <= names, names
    at = out / cause_layer / "activations_at.png"
    assert at.is_file(), sorted(names)
    with Image.open(at) as img:
        assert img.size[0] > 200 and img.size[1] > 100
        assert len(set(img.convert("L").getdata())) > 5  # drawn, not blank
    rows = {(r["layer"], r["figure"], r["tag"]) for r in record.figures}
    assert (cause_layer, "activations", "at") in rows
    html = (out / "report.html").read_text()
    assert f"<code>{cause_layer}</code>" in html and "at the step that fired" in html
    assert "Non-finite" in (out / "summary.md").read_text()
    return names


@pytest.fixture(scope="module")
def truth():
    return oracle_first_nonfinite()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "probe"
    return loops.run_plain(out), out


def test_plain_loop_names_the_bug(plain, truth):
    findings, out = plain
    step, layer = truth
    assert (step, layer) == (loops.BUG_STEP, "net.2")
    assert first_incident(findings) == (step, layer, "activation", "nonfinite")
    check_files(out, layer)


@pytest.mark.slow
@pytest.mark.parametrize("package", ["lightning", "pytorch_lightning"])
def test_trainers_agree_with_the_plain_loop(tmp_path, plain, truth, package):
    findings = loops.run_trainer(tmp_path / "probe", package)
    assert summary(findings) == summary(plain[0])
    assert first_incident(findings) == (*truth, "activation", "nonfinite")
    assert check_files(tmp_path / "probe", truth[1]) == check_files(plain[1], truth[1])


@pytest.mark.slow
def test_fabric_agrees_with_the_plain_loop(tmp_path, plain, truth):
    findings = loops.run_fabric(tmp_path / "probe")
    assert summary(findings) == summary(plain[0])
    assert check_files(tmp_path / "probe", truth[1]) == check_files(plain[1], truth[1])


@pytest.mark.ddp
@pytest.mark.slow
def test_fabric_ddp_two_processes(tmp_path, truth):
    out = tmp_path / "probe"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    res = subprocess.run([sys.executable, str(TESTS / "loops.py"), "fabric-ddp", str(out)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rows in ranks:  # every rank holds the same, merged findings
        cause = next(r for r in rows if r["cause"] and r["incident"] == min(x["incident"] for x in rows))
        assert (cause["step"], cause["layer"], cause["signal"], cause["kind"]) == (*truth, "activation", "nonfinite")
    assert ranks[0] == ranks[1]
    check_files(out, truth[1])  # rank 0 wrote them


def test_closed_run_cannot_reopen(plain):
    from lit_probe import ProbeError, ProbeRun

    run = ProbeRun(loops.Model(), ["net.0"], save_dir=str(plain[1].parent / "again"), figure_every_n_steps=None)
    with run:
        pass
    with pytest.raises(ProbeError, match="closed"):
        run.open()


def test_resume_keeps_finding_extra(tmp_path):
    """A run's state (what a checkpoint keeps) restores every finding with its ``extra`` (weights_only load)."""
    from lit_probe import ProbeRun

    model = loops.Model()
    opt = loops.optimizer(model)
    with ProbeRun(model, ["net.**"], optimizers=[opt], save_dir=str(tmp_path / "a"), figure_every_n_steps=None,
                  log_every_n_steps=5) as run:
        for x, y in loops.loader():
            with run.step():
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()
        state = run.state_dict()
    assert any(f.extra for f in run.findings), run.findings  # e.g. the streams a NaN reached downstream
    torch.save(state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    again = ProbeRun(loops.Model(), ["net.**"], save_dir=str(tmp_path / "b"), figure_every_n_steps=None)
    again.load_state_dict(loaded)
    with again:
        assert again.findings == run.findings
        assert [f.extra for f in again.findings] == [f.extra for f in run.findings]


def test_containers_are_not_layers_that_never_ran(tmp_path):
    """`net.**` on a model with a ModuleList: the list is never called by design; a bypassed layer is said."""
    from lit_probe import ProbeRun

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)])
            self.unused = torch.nn.Linear(8, 8)

        def forward(self, x):
            for b in self.blocks:
                x = torch.relu(b(x))
            return x

    model = Net()
    with ProbeRun(model, ["**"], save_dir=str(tmp_path), figure_every_n_steps=None) as run:
        for _ in range(3):
            with run.step():
                model(torch.randn(4, 8)).sum().backward()
    assert run.record.never_ran == ["unused"]


def test_a_bad_probe_path_fails_at_open_and_leaves_no_hook(tmp_path):
    from lit_probe import ProbeRun, ProbeSelectionError

    model = loops.Model()
    with pytest.raises(ProbeSelectionError, match="Closest real paths: .net\.\d"):
        with ProbeRun(model, ["net.0", "net.O"], save_dir=str(tmp_path), figure_every_n_steps=None):
            pass
    assert all(not m._forward_hooks for m in model.modules())


def test_plain_loop_with_a_grad_scaler_skips_are_not_findings(tmp_path):
    """A GradScaler in a plain loop: the scaled gradients are judged unscaled, a step the scaler skips (inf
    gradients by design) is no finding, and the weights' NaN never comes (the step is skipped)."""
    from lit_probe import ProbeRun

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    with ProbeRun(model, ["**"], optimizers=[opt], loss_scale=scaler, save_dir=str(tmp_path),
                  figure_every_n_steps=None, log_every_n_steps=4) as run:
        for step, (x, y) in enumerate(loops.loader()):
            with run.step():
                loss = torch.nn.functional.cross_entropy(model(x), y)
                if step == 5:
                    loss = loss * float("inf")  # the scaler sees inf gradients and skips this step
                run.before_backward()
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert 5 in run.skipped_steps and run.findings == [], run.findings
    assert not [f for f in run.findings if f.signal == "parameter"], run.findings
