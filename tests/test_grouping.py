"""Causes and their consequences grouped into one incident (issue 21).

* a vanishing stack (30-layer tanh MLP, SGD): the first Linear layers are also ``not_learning`` (the oracle: their
  update ratio is below 1e-5 of their weights); those findings join the vanishing incident as its consequences,
  and the incident, ``summary.md`` and ``report.html`` say so;
* dead units (a ReLU whose every unit is below zero): no gradient reaches the Linear before it (the oracle: its
  output gradient is exactly 0); the dead incident lists it as blocked;
* the grouping rule itself on findings (pure): not_learning under vanishing only for the vanishing incident's
  modules, vanishing under an earlier dead incident.
"""

from __future__ import annotations

from typing import Any

import torch

import zoo
from lit_probe import FeatureProbe
from lit_probe.findings import Finding, group_incidents, incidents_of
from lit_probe.record import read_record
from models import Classifier, make_loader, make_trainer, mlp, zoo_module

STEPS = 60


class _Watched(Classifier):
    """A classifier whose oracle (:class:`zoo.Oracle`) starts a step record at each training step."""

    oracle: Any = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.oracle.begin_step(int(self.global_step))
        return super().training_step(batch, batch_idx)


def test_not_learning_of_a_vanishing_stack_is_a_consequence_of_the_vanishing_incident(tmp_path):
    torch.set_num_threads(1)
    entry = zoo.BUG_MODELS["tanh_mlp30"]
    _, plain, _ = zoo.train_plain(entry, steps=STEPS, units=False)
    linear = [n for n in plain.names() if plain.types()[n] == "Linear"]
    truth = zoo.vanishing_oracle(plain.steps, linear[0], linear[-1], 10, STEPS)
    assert truth["vanishing"] and truth["max_update_ratio"] < 1e-5, truth

    module = zoo_module(entry, "lightning")
    probe = FeatureProbe(probes=["net.**"], figure_every_n_steps=None, log_every_n_steps=10,
                         save_dir=str(tmp_path / "probe"))
    make_trainer(tmp_path, "lightning", max_steps=STEPS, callbacks=[probe], limit_val_batches=0,
                 log_every_n_steps=10).fit(module, zoo.make_loader(entry))

    stuck = [f for f in probe.findings if f.kind == "not_learning"]
    assert any(f.layer == "net." + linear[0] for f in stuck), [f.layer for f in stuck]
    incidents = probe.incidents
    assert [i.kind for i in incidents] == ["vanishing"], [(i.kind, i.layer) for i in incidents]
    van = incidents[0]
    for f in stuck:
        assert f.incident == van.id and not f.cause and f.extra["consequence_of"] == "vanishing", f
        assert "A consequence of the vanishing gradient" in f.message, f.message
    assert any(c.startswith(f"`net.{linear[0]}` not_learning") for c in van.consequences), van.consequences

    record = read_record(tmp_path / "probe")
    assert record.incidents[0]["consequences"] == list(van.consequences)
    summary = (tmp_path / "probe" / "summary.md").read_text()
    assert "## Consequences" in summary and f"`net.{linear[0]}` not_learning" in summary, summary
    report = (tmp_path / "probe" / "report.html").read_text()
    assert "<b>Consequences</b>" in report and f"<code>net.{linear[0]}</code> not_learning" in report


def test_dead_units_list_the_layers_they_block(tmp_path):
    """The first hidden ReLU never fires (its Linear's bias at -100): the dead finding names the Linear before it,
    whose output gradient the oracle sees exactly 0 on every step."""
    torch.manual_seed(0)
    net = mlp(depth=2)
    with torch.no_grad():
        net[0].bias.fill_(-100.0)
    model = _Watched(net, lr=0.05)
    probe = FeatureProbe(probes=["net.**"], figure_every_n_steps=None, log_every_n_steps=5,
                         save_dir=str(tmp_path / "probe"))
    orc = model.oracle = zoo.Oracle(model, units=False, include=lambda p: p.startswith("net.")).attach()
    steps = 30
    try:
        make_trainer(tmp_path, max_steps=steps, callbacks=[probe], log_every_n_steps=5).fit(model, make_loader())
    finally:
        orc.detach()
    zero = [s for s in range(steps) if s in orc.steps and orc.steps[s].by_name()["net.0"].grad_l2 == 0]
    assert len(zero) == steps, zero  # ground truth: no gradient reaches net.0, ever
    dead = [f for f in probe.findings if f.kind == "dead"]
    assert dead and dead[0].layer == "net.1", [(f.kind, f.layer) for f in probe.findings]
    assert "net.0" in dead[0].extra["blocked"], dead[0].extra
    # a later dead layer (net.3) does not claim net.0: the nearest dead layer after it starves it
    assert all("net.0" not in f.extra.get("blocked", []) for f in dead[1:]), [f.extra for f in dead]
    inc = next(i for i in probe.incidents if i.id == dead[0].incident)
    assert any("blocked" in c and "`net.0`" in c for c in inc.consequences), inc.consequences
    assert "No gradient at all reaches" in dead[0].message
    assert not [f for f in probe.findings if f.kind in ("vanishing", "not_learning")]


def _f(step: int, layer: str, kind: str, signal: str = "gradient", **extra) -> Finding:
    return Finding(step=step, layer=layer, signal=signal, kind=kind, value=0.0, threshold=1.0,
                   message=f"{kind} at {layer}.", extra=extra)


def test_grouping_rule_on_findings():
    new = [_f(4, "net.5", "vanishing"), _f(4, "net.0", "vanishing"),
           _f(4, "net.0", "not_learning", "parameter"), _f(6, "other.fc", "not_learning", "parameter")]
    kept, dropped = group_incidents([], new)
    assert not dropped and [f.layer for f in kept] == [f.layer for f in new]  # the order given
    van, nl, other = kept[0], kept[2], kept[3]
    assert van.cause and nl.incident == van.incident and nl.extra["consequence_of"] == "vanishing"
    assert "A consequence of the vanishing gradient of incident 0 (`net.5`, step 4)" in nl.message
    assert other.cause and other.incident != van.incident  # not a module of the vanishing incident
    inc = {i.id: i for i in incidents_of(kept)}
    assert inc[van.incident].consequences == ("`net.0` not_learning (step 4): its gradient vanished, so the "
                                              "optimizer barely moves it (not a learning-rate problem)",)
    assert inc[other.incident].consequences == ()

    # dead units first, a vanishing gradient before them later: one incident, the dead one
    dead = _f(10, "blk.relu", "dead", "activation", since=3)
    kept, _ = group_incidents([], [dead])
    later, _ = group_incidents(kept, [_f(12, "blk.conv", "vanishing")])
    assert later[0].incident == kept[0].incident and later[0].extra["consequence_of"] == "dead"
    # ... but not once the dead incident is over (more than INCIDENT_GAP steps after)
    far, _ = group_incidents(kept, [_f(200, "blk.conv", "vanishing")])
    assert far[0].cause and "consequence_of" not in far[0].extra
    # the instability family is unchanged: a learning rate too high, then the explosion, is one incident
    kept, _ = group_incidents([], [_f(3, "fc", "lr_too_high", "parameter"), _f(5, "fc", "exploding")])
    assert kept[0].incident == kept[1].incident and kept[0].cause and not kept[1].cause
    assert "consequence_of" not in kept[1].extra


def test_a_module_of_a_block_counts_as_in_the_block():
    kept, _ = group_incidents([], [_f(4, "enc.0", "vanishing"), _f(5, "enc.0.fc", "not_learning", "parameter")])
    assert kept[1].incident == kept[0].incident and kept[1].extra["consequence_of"] == "vanishing"
