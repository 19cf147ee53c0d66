"""FeatureProbe in a real Trainer.fit: arguments, resolution, lifecycle, tear-down, observer effect, policies."""

from __future__ import annotations

import copy
import csv
import gc
import io
import pickle
import weakref

import pytest
import torch
import torchvision
from torch import nn

from lit_probe import FeatureProbe, ProbeAlarm, ProbeConfigError, ProbeMixin
from lit_probe.callback import ProbeWarning
from lit_probe.hooks import hook_snapshot
from models import Classifier, Mixed, MixinNet, TinyCNN, make_loader, mlp, trainer


# ---------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("kwargs, match", [
    ({"every_n_steps": 0}, "every_n_steps"),
    ({"every_n_steps": -5}, "every_n_steps"),
    ({"log_every_n_steps": 0}, "log_every_n_steps"),
    ({"on_finding": "explode"}, "on_finding.*'warn', 'raise', 'stop'"),
    ({"thresholds": {"dead_fractoin": 0.9}}, "Unknown threshold 'dead_fractoin'.*dead_fraction"),
    ({"thresholds": {"dead_fraction": 1.5}}, "out of range"),
    ({"thresholds": {"dead_window": 0}}, "dead_window"),
    ({"thresholds": {"exploding_absmax": -1}}, "exploding_absmax"),
    ({"signals": ("activation", "grads")}, "signals"),
    ({"signals": ()}, "signals"),
    ({"probes": ["re:("]}, "regular expression"),
    ({"probes": [""]}, "empty"),
    ({"mode": "append"}, "mode"),
    ({"figures": ("activations", "pie")}, "figures"),
    ({"max_channels": 0}, "max_channels"),
    ({"figure_every_n_steps": 0}, "figure_every_n_steps"),
    ({"figure_share": 0}, "figure_share"),
    ({"figure_share": 1.5}, "figure_share"),
    ({"figure_share": True}, "figure_share"),
])
def test_bad_arguments_fail_in_init(kwargs, match):
    kwargs.setdefault("probes", ["net"])
    with pytest.raises(ProbeConfigError, match=match):
        FeatureProbe(**kwargs)


def test_probe_pickles_before_fit():
    p = FeatureProbe(probes=["layer1", "layer3.*"], thresholds={"dead_fraction": 0.9})
    q = pickle.loads(pickle.dumps(p))
    assert q.probes == ["layer1", "layer3.*"] and q.thresholds.dead_fraction == 0.9


# ---------------------------------------------------------------------------------------------- resolution
class CountSteps(Classifier):
    def __init__(self):
        super().__init__(mlp())
        self.steps_run = 0

    def training_step(self, batch, batch_idx):
        self.steps_run += 1
        return super().training_step(batch, batch_idx)


def test_unknown_path_fails_before_any_training_step(tmp_path):
    m = CountSteps()
    t = trainer(tmp_path, callbacks=[FeatureProbe(probes=["net.O", "net.2"])])
    with pytest.raises(ProbeConfigError, match=r"'net\.O' is not a module.*'net\.0'"):
        t.fit(m, make_loader())
    assert m.steps_run == 0
    assert all(not mod._forward_hooks for mod in m.modules())


def test_nothing_to_probe_lists_top_level_modules(tmp_path):
    t = trainer(tmp_path, callbacks=[FeatureProbe()])
    with pytest.raises(ProbeConfigError, match="nothing to probe.*'net'"):
        t.fit(CountSteps(), make_loader())


def test_mixin_points_union_with_probes(tmp_path):
    p = FeatureProbe(probes=["net.4"], save_dir=str(tmp_path / "p"))
    trainer(tmp_path, callbacks=[p], max_steps=3).fit(MixinNet(), make_loader())
    assert p.points == ["net.0", "net.2", "net.4"]


def test_mixin_method_and_configure_model(tmp_path):
    class Lazy(ProbeMixin, Classifier):
        def __init__(self):
            super().__init__(nn.Identity())

        def configure_model(self):
            if isinstance(self.net, nn.Identity):
                self.net = mlp()

        def configure_probes(self):
            return ["net.*"]

    p = FeatureProbe(save_dir=str(tmp_path / "p"))
    trainer(tmp_path, callbacks=[p], max_steps=3).fit(Lazy(), make_loader())
    assert p.points == ["net.0", "net.1", "net.2", "net.3", "net.4"]


# ---------------------------------------------------------------------------------------------- tear-down
class UserHooked(Classifier):
    pass


def test_hooks_restored_after_fit_user_hooks_kept(tmp_path):
    m = Classifier(TinyCNN())
    user_calls = []
    user = m.net.bn2.register_forward_hook(lambda mod, i, o: user_calls.append(1))
    before = hook_snapshot(m)
    p = FeatureProbe(probes=["net.**"], save_dir=str(tmp_path / "p"), every_n_steps=1)
    trainer(tmp_path, callbacks=[p], max_steps=4).fit(m, make_loader(image=(3, 8, 8)))
    assert hook_snapshot(m) == before
    assert len(user_calls) == 4
    user.remove()
    # the model pickles, deep-copies and saves; nothing of the run is left attached
    pickle.dumps(m)
    copy.deepcopy(m)
    torch.save(m, io.BytesIO())
    assert p.session is not None and p.session.modules == []


def test_model_is_freed_while_probe_lives(tmp_path):
    m = Classifier(mlp())
    p = FeatureProbe(probes=["net.*"], save_dir=str(tmp_path / "p"))
    t = trainer(tmp_path, callbacks=[p], max_steps=3)
    t.fit(m, make_loader())
    ref = weakref.ref(m)
    del m, t
    gc.collect()
    assert ref() is None
    assert p.points and len(p.session.history) > 0  # the small statistics history stays


class Boom(Classifier):
    def __init__(self, exc):
        super().__init__(mlp())
        self.exc = exc

    def training_step(self, batch, batch_idx):
        if self.global_step == 3:
            raise self.exc
        return super().training_step(batch, batch_idx)


def test_exception_removes_hooks_writes_files_and_reraises(tmp_path):
    m = Boom(ValueError("user bug at step 3"))
    before = hook_snapshot(m)
    p = FeatureProbe(probes=["net.*"], save_dir=str(tmp_path / "p"))
    with pytest.raises(ValueError, match="user bug at step 3"):
        trainer(tmp_path, callbacks=[p], max_steps=10).fit(m, make_loader())
    assert hook_snapshot(m) == before
    assert (tmp_path / "p" / "findings.jsonl").exists()
    assert "exception" in (tmp_path / "p" / "summary.md").read_text()


def test_keyboard_interrupt_removes_hooks(tmp_path):
    m = Boom(KeyboardInterrupt())
    before = hook_snapshot(m)
    p = FeatureProbe(probes=["net.*"], save_dir=str(tmp_path / "p"))
    t = trainer(tmp_path, callbacks=[p], max_steps=10)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        t.fit(m, make_loader())
    assert hook_snapshot(m) == before
    assert (tmp_path / "p" / "summary.md").exists()


# ---------------------------------------------------------------------------------------------- real models
def test_resnet_every_leaf_trains_and_observes_only(tmp_path):
    """Every leaf of a torchvision ResNet (in-place ReLU, shared relu, out += identity): bit-identical run."""
    def run(with_probe):
        torch.manual_seed(0)
        m = Classifier(torchvision.models.resnet18(weights=None, num_classes=4), lr=0.01)
        cbs = [FeatureProbe(probes=["net.**"], every_n_steps=1, save_dir=str(tmp_path / "p"),
                            figure_every_n_steps=None)] if with_probe else []
        trainer(tmp_path, callbacks=cbs, max_steps=30).fit(m, make_loader(n=16 * 30, image=(3, 32, 32)))
        return m, cbs

    m0, _ = run(False)
    m1, cbs = run(True)
    assert m0.losses == m1.losses  # bit-identical losses
    for (n0, p0), (n1, p1) in zip(m0.state_dict().items(), m1.state_dict().items()):
        assert n0 == n1 and torch.equal(p0, p1), n0
    assert m1.training == m0.training
    leaves = [n for n, mod in m1.named_modules() if not list(mod.children()) and n]
    assert set(cbs[0].points) <= set(n for n, _ in m1.named_modules())
    assert {n for n in leaves if n.startswith("net.")} <= set(cbs[0].points)  # `**` selects every leaf
    s = cbs[0].session
    scal = s.latest_scalars()
    assert scal["net.layer1.0.bn2/grad_rms"] > 0  # the gradient behind `out += identity` was captured
    assert scal["net.relu/act_rms"] > 0
    # BasicBlock calls its one `relu` twice: two streams, each measured on its own
    assert scal["net.layer1.0.relu/act_rms"] > 0 and scal["net.layer1.0.relu#1/act_rms"] > 0
    assert scal["net.layer1.0.relu/act_rms"] != scal["net.layer1.0.relu#1/act_rms"]


def test_module_reuse_dict_outputs_frozen_modules(tmp_path):
    torch.manual_seed(0)
    p = FeatureProbe(probes=["net.frozen", "net.dict_out", "net.shared", "net.head"], every_n_steps=1,
                     save_dir=str(tmp_path / "p"))
    trainer(tmp_path, callbacks=[p], max_steps=5).fit(Classifier(Mixed()), make_loader())
    from lit_probe.history import STATS

    s = p.session
    steps, v = s.history.window()
    calls = v[:, :, STATS.index("calls")]
    for stream in ("net.shared", "net.shared#1"):  # called twice a step: one stream per call
        assert (calls[:, s.slot_of(stream, "activation")] == 1).all()
        assert (calls[:, s.slot_of(stream, "gradient")] == 1).all()
    assert (calls[:, s.slot_of("net.frozen", "activation")] == 1).all()
    assert (calls[:, s.slot_of("net.frozen", "gradient")] == 0).all()  # no grad path
    assert (calls[:, s.slot_of("net.dict_out", "activation")] == 2).all()  # both tensors of the dict output
    assert (calls[:, s.slot_of("net.dict_out", "gradient")] == 2).all()  # and both gradients


def test_validation_under_no_grad_and_metrics_in_csv(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    torch.manual_seed(0)
    p = FeatureProbe(probes=["net.0", "net.1"], probe_validation=True, save_dir=str(tmp_path / "p"),
                     thresholds={"dead_window": 5})  # dead_fraction is logged once its window has been seen
    t = trainer(tmp_path, callbacks=[p], max_steps=10, logger=CSVLogger(tmp_path), num_sanity_val_steps=2,
                limit_val_batches=2, val_check_interval=5, log_every_n_steps=5)
    t.fit(Classifier(mlp()), make_loader(n=160), make_loader(seed=1))
    rows = list(csv.DictReader(open(t.logger.log_dir + "/metrics.csv")))
    keys = set(rows[0])
    for k in ("probe/net.0/act_rms", "probe/net.0/grad_rms", "probe/net.1/dead_fraction",
              "probe/net.0/act_zero_fraction", "probe/net.1/val_act_rms"):
        assert k in keys, sorted(keys)
    assert any(r["probe/net.0/act_rms"] for r in rows)


def test_model_summary_and_sanity_forwards_are_not_counted(tmp_path):
    class WithExample(Classifier):
        def __init__(self):
            super().__init__(mlp())
            self.example_input_array = torch.randn(2, 16)

    p = FeatureProbe(probes=["net.0"], every_n_steps=1, save_dir=str(tmp_path / "p"))
    t = trainer(tmp_path, callbacks=[p], max_steps=3, enable_model_summary=True, num_sanity_val_steps=2)
    t.fit(WithExample(), make_loader(), make_loader(seed=1))
    from lit_probe.history import STATS

    steps, v = p.session.history.window()
    assert list(steps) == [0, 1, 2]
    assert (v[:, 0, STATS.index("calls")] == 1).all()


# ---------------------------------------------------------------------------------------------- policies
def nan_model():
    from test_bugs import NaNAt, StepAware

    net = mlp(depth=3)
    net[2] = NaNAt(32, k=4)
    return StepAware(net)


def test_policy_warn_names_every_layer(tmp_path):
    p = FeatureProbe(probes=["net.*"], save_dir=str(tmp_path / "p"), log_every_n_steps=50)
    with pytest.warns(ProbeWarning) as rec:
        trainer(tmp_path, callbacks=[p], max_steps=8).fit(nan_model(), make_loader(n=128))
    msgs = [str(w.message) for w in rec if issubclass(w.category, ProbeWarning)]
    assert any("net.2" in m and "activation" in m for m in msgs)
    assert any("gradient" in m for m in msgs)  # a second finding is not swallowed by warning de-duplication


def test_policy_raise(tmp_path):
    m = nan_model()
    before = hook_snapshot(m)
    p = FeatureProbe(probes=["net.*"], save_dir=str(tmp_path / "p"), on_finding="raise")
    with pytest.raises(ProbeAlarm, match="net.2") as err:
        trainer(tmp_path, callbacks=[p], max_steps=20).fit(m, make_loader(n=320))
    assert err.value.findings[0].step == 4
    assert hook_snapshot(m) == before
    assert "net.2" in (tmp_path / "p" / "findings.jsonl").read_text()


def test_policy_stop(tmp_path):
    m = nan_model()
    p = FeatureProbe(probes=["net.*"], save_dir=str(tmp_path / "p"), on_finding="stop")
    t = trainer(tmp_path, callbacks=[p], max_steps=20)
    with pytest.warns(ProbeWarning):
        t.fit(m, make_loader(n=320))
    assert t.global_step == 5  # stopped right after the step that showed the NaN
    assert p.findings[0].step == 4
    marks = p.session.timeline(p.findings).marks  # the timeline marks the probe's (grouped) findings
    assert marks and marks[0][:2] == (p.findings[0].layer, 4)


def test_state_round_trip_is_weights_only_safe(tmp_path):
    torch.manual_seed(0)
    net = mlp(depth=3)
    with torch.no_grad():
        net[2].bias.fill_(-100.0)
    p = FeatureProbe(probes=["net.*"], save_dir=str(tmp_path / "p"), every_n_steps=1)
    with pytest.warns(ProbeWarning):
        trainer(tmp_path, callbacks=[p], max_steps=30).fit(Classifier(net), make_loader(n=480))
    assert p.session is not None  # after fit the probe still holds its last session: its state is saved
    state = p.state_dict()
    assert state["findings"] and state["session"]["names"] == p.points
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    q = FeatureProbe(probes=["net.*"])
    q.load_state_dict(loaded)
    assert q._pending_state["findings"] == state["findings"]
