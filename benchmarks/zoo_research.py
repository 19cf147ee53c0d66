#!/usr/bin/env python
"""Research on the zoo of real models (``tests/zoo.py``): what healthy training looks like per call stream,
what the injected bugs look like, and how candidate detector rules score on both.

No lit_probe code runs here: every number comes from the plain-PyTorch oracle (``tests/zoo.Oracle``). Run it
from the repository root as a module (``tests.zoo`` is imported as a package path):

    python -m benchmarks.zoo_research time                            # seconds per 40 plain steps, per model
    python -m benchmarks.zoo_research collect --steps 60 --out DIR    # healthy runs + bug runs -> DIR/*.pkl
    python -m benchmarks.zoo_research evaluate --out DIR              # DIR/*.pkl -> DIR/zoo_report.md
    python -m benchmarks.zoo_research all                             # both, into a fresh temporary directory

``--out`` defaults to a fresh ``tempfile.mkdtemp()`` (printed); ``--report`` to ``<out>/zoo_report.md``.

``collect`` writes one pickle per run (per call stream and step: activation rms / absmax, per-element gradient
RMS, gradient L2 norm, position in forward and backward order; per module with parameters: ||grad||, ||W||,
||dW||/||W||; per stream and 20-step window: fraction of units never positive, fraction of units constant).
``evaluate`` reads them and writes the Markdown report. Always one torch thread (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    from tests import zoo
except ImportError as err:  # run as a script, or from another directory
    raise SystemExit("run from the repository root: python -m benchmarks.zoo_research ...") from err

#: where runs are pickled and read back (``--out``; set by :func:`main`)
OUT = Path(".")
DEAD_WINDOW = 20


# ------------------------------------------------------------------------------------------------ collect
def summarise(orc: zoo.Oracle, losses: list[float], extra: dict | None = None) -> dict[str, Any]:
    """Per-stream arrays from an oracle run."""
    steps = sorted(orc.steps)
    names = orc.names()
    idx = {n: i for i, n in enumerate(names)}
    S, C = len(steps), len(names)

    def arr() -> np.ndarray:
        return np.full((S, C), np.nan)

    a_rms, a_abs, g_rms, g_l2, g_abs, fwd, bwd, a_nf, g_nf, numel = (arr() for _ in range(10))
    types, paths = {}, {}
    for si, s in enumerate(steps):
        for c in orc.steps[s].calls:
            j = idx[c.name]
            types[c.name], paths[c.name] = c.type, c.path
            a_rms[si, j], a_abs[si, j], fwd[si, j], a_nf[si, j], numel[si, j] = (c.rms, c.absmax, c.fwd_index,
                                                                                 c.nonfinite, c.numel)
            if c.grad_index is not None:
                g_rms[si, j], g_l2[si, j], g_abs[si, j] = c.grad_rms, c.grad_l2, c.grad_absmax
                bwd[si, j], g_nf[si, j] = c.grad_index, c.grad_nonfinite
    params: dict[str, dict[str, np.ndarray]] = {}
    for si, s in enumerate(steps):
        for path, st in orc.steps[s].params.items():
            d = params.setdefault(path, {k: np.full(S, np.nan) for k in ("grad_norm", "param_norm",
                                                                         "update_ratio", "numel")})
            for k in d:
                d[k][si] = st.get(k, np.nan)
    units: dict[str, dict[str, Any]] = {}
    last = steps[-1] + 1 if steps else 0
    starts = list(range(0, max(1, last - DEAD_WINDOW + 1), 10))
    for n in names:
        npos = orc.never_positive(n, 0, last)
        if npos is None:
            continue
        units[n] = {"n_units": int(npos.numel()), "starts": starts,
                    "dead": [orc.dead_fraction(n, s0, DEAD_WINDOW) for s0 in starts],
                    "const": [orc.constant_fraction(n, s0, DEAD_WINDOW, across_steps=True) for s0 in starts],
                    "const_samples": [orc.constant_fraction(n, s0, DEAD_WINDOW, across_steps=False)
                                      for s0 in starts]}
    return {"steps": steps, "names": names, "types": [types[n] for n in names], "paths": [paths[n] for n in names],
            "act_rms": a_rms, "act_absmax": a_abs, "grad_rms": g_rms, "grad_l2": g_l2, "grad_absmax": g_abs,
            "fwd": fwd, "bwd": bwd, "act_nonfinite": a_nf, "grad_nonfinite": g_nf, "numel": numel,
            "params": params, "units": units, "losses": losses,
            "first_nonfinite_activation": orc.first_nonfinite_activation(),
            "first_nonfinite_gradient": orc.first_nonfinite_gradient(), **(extra or {})}


def _save(name: str, data: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / f"{name}.pkl", "wb") as f:
        pickle.dump(data, f)


def _load(name: str) -> dict | None:
    p = OUT / f"{name}.pkl"
    if not p.exists():
        return None
    with open(p, "rb") as f:
        return pickle.load(f)


def collect_healthy(names: list[str], steps: int) -> None:
    for name in names:
        e = zoo.ZOO[name]
        t = time.perf_counter()
        _, orc, losses = zoo.train_plain(e, steps=steps)
        dt = time.perf_counter() - t
        _save(f"healthy_{name}", summarise(orc, losses, {"model": name, "seconds": dt}))
        print(f"healthy {name}: {dt:.1f}s, {len(orc.names())} streams, loss {losses[0]:.3f} -> {losses[-1]:.3f}",
              flush=True)


def _bn_relu_pairs(orc: zoo.Oracle) -> list[tuple[str, str]]:
    """(BatchNorm path, the ReLU call right after it in forward order) on step 0."""
    calls = orc.steps[0].calls
    return [(a.path, b.name) for a, b in zip(calls, calls[1:])
            if a.type.startswith("BatchNorm") and b.type in ("ReLU", "ReLU6") and a.call == 0]


NAN_AT, NAN_STEP, KILL_AT = zoo.NAN_AT, zoo.NAN_STEP, zoo.KILL_AT


BUG_PARTS = ("vanishing", "dying", "lr50", "nan", "dead")


def collect_bugs(models: list[str], steps: int, parts: tuple[str, ...] = BUG_PARTS) -> None:
    # vanishing stacks (SGD): healthy-looking runs of broken models
    for name in ("tanh_mlp30", "tanh_mlp30_small_init", "sigmoid15") if "vanishing" in parts else ():
        e = zoo.BUG_MODELS[name]
        _, orc, losses = zoo.train_plain(e, steps=steps)
        last = [n for n in orc.names() if orc.types()[n] == "Linear"]
        truth = zoo.vanishing_oracle(orc.steps, last[0], last[-1], 10, steps)
        _save(f"bug_vanish_{name}", summarise(orc, losses, {"model": name, "truth": truth}))
        print(f"vanishing {name}: {json.dumps(truth)}", flush=True)
    if "dying" in parts:
        collect_dying(steps)
    if "lr50" in parts:
        collect_lr50()
    # NaN injection
    for name in models if "nan" in parts else ():
        if name not in NAN_AT:
            continue
        e = zoo.ZOO[name]
        torch.manual_seed(0)
        net = e.build()
        clock = zoo.inject_nan(net.get_submodule(NAN_AT[name]), NAN_STEP)
        _, orc, losses = zoo.train_plain(e, steps=NAN_STEP + 2, net=net, units=False, params=False,
                                         before_step=lambda s, _n: clock(s))
        fa, fg = orc.first_nonfinite_activation(), orc.first_nonfinite_gradient()
        calls = orc.steps[NAN_STEP].calls
        nf = [c.name for c in calls if c.nonfinite]
        _save(f"bug_nan_{name}", {"model": name, "at": NAN_AT[name], "step": NAN_STEP, "first_activation": fa,
                                  "first_gradient": fg, "nonfinite_calls": nf[:6], "n_nonfinite": len(nf),
                                  "n_calls": len(calls), "losses": losses})
        print(f"nan {name} at {NAN_AT[name]}@{NAN_STEP}: first act {fa} grad {fg}; next {nf[1:3]}", flush=True)
    # dead block
    for name in models if "dead" in parts else ():
        if name not in KILL_AT:
            continue
        e = zoo.ZOO[name]
        torch.manual_seed(0)
        net = e.build()
        zoo.kill_block(net, KILL_AT[name])
        _, orc, losses = zoo.train_plain(e, steps=30, net=net, params=False)
        relu_dead = orc.dead_calls(0, DEAD_WINDOW, 0.5, types=("ReLU", "ReLU6"))
        any_dead = orc.dead_calls(0, DEAD_WINDOW, 0.5)
        const = [(n, orc.constant_fraction(n, 0, DEAD_WINDOW)) for n in orc.names()]
        const = [(n, f) for n, f in const if f >= 0.5]
        pairs = [b for a, b in _bn_relu_pairs(orc) if a == KILL_AT[name]]
        data = {"model": name, "at": KILL_AT[name], "relu_after": pairs, "relu_dead": relu_dead,
                "any_dead": any_dead, "constant": const, "losses": losses,
                "first_dead": orc.first_dead(DEAD_WINDOW), "summary": summarise(orc, losses)}
        _save(f"bug_dead_{name}", data)
        print(f"dead {name} kill {KILL_AT[name]} (relu after: {pairs}): ReLU dead {relu_dead[:4]}; any dead "
              f"{[n for n, _ in any_dead][:6]}; constant {[n for n, _ in const][:6]}", flush=True)


def collect_dying(steps: int) -> None:
    """Real dying, nothing injected: squeezenet1_1 (dropout 0) with SGD 0.01."""
    e = zoo.BUG_MODELS["squeezenet_dying"]
    _, orc, losses = zoo.train_plain(e, steps=steps, params=False)
    fd = orc.first_dead(DEAD_WINDOW)
    _save("bug_dying_squeezenet", {"model": "squeezenet_dying", "first_dead": fd, "losses": losses,
                                   "summary": summarise(orc, losses)})
    print(f"squeezenet dying: loss {losses[0]:.3f} -> {losses[-1]:.4f}; first dead ReLU call {fd}", flush=True)


def collect_lr50() -> None:
    """resnet18 with SGD lr=50: explosion, then NaN."""
    e = zoo.BUG_MODELS["resnet18_lr50"]
    _, orc, losses = zoo.train_plain(e, steps=14)
    data = summarise(orc, losses, {"model": "resnet18_lr50",
                                   "first_exploding_activation": orc.first_exploding("activation"),
                                   "first_exploding_gradient": orc.first_exploding("gradient")})
    _save("bug_lr50_resnet18", data)
    print(f"lr50: losses {[f'{x:.3g}' for x in losses]} first NaN act {data['first_nonfinite_activation']} "
          f"grad {data['first_nonfinite_gradient']}; first exploding act {data['first_exploding_activation']} "
          f"grad {data['first_exploding_gradient']}", flush=True)


def time_models(names: list[str], steps: int) -> dict[str, float]:
    out = {}
    for name in names:
        e = zoo.ZOO[name]
        zoo.train_plain(e, steps=2, oracle=False)  # warm-up (imports, allocator)
        t = time.perf_counter()
        zoo.train_plain(e, steps=steps, oracle=False)
        out[name] = time.perf_counter() - t
        t = time.perf_counter()
        zoo.train_plain(e, steps=steps, oracle=True, params=False)
        print(f"{name:22s} {out[name]:6.1f}s / {steps} steps (with oracle {time.perf_counter() - t:6.1f}s)",
              flush=True)
    return out


# ----------------------------------------------------------------------------------------------- evaluate
def _trailing_median(x: np.ndarray, w: int) -> np.ndarray:
    """[S, C] -> [S, C]: median over the last ``w`` steps (NaN until ``w`` finite values)."""
    out = np.full_like(x, np.nan)
    for s in range(w - 1, x.shape[0]):
        blk = x[s - w + 1:s + 1]
        ok = np.isfinite(blk).sum(0) >= w
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(blk, axis=0)
        out[s] = np.where(ok, med, np.nan)
    return out


def _envelope(x: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Per step, per stream i: max of x over the streams computed at or before i in forward order."""
    out = np.full_like(x, np.nan)
    for s in range(x.shape[0]):
        o = order[s]
        ok = np.isfinite(o) & np.isfinite(x[s])
        idx = np.where(ok)[0]
        idx = idx[np.argsort(o[idx])]
        run = -np.inf
        for j in idx:
            run = max(run, x[s, j])
            out[s, j] = run
    return out


def vanishing_scores(d: dict, warmup: int = 5) -> dict[str, tuple[float, str]]:
    """Per rule: (log10 margin, worst stream). margin = statistic / threshold at its smallest over the run
    (after ``warmup`` steps); < 0 means the rule fires."""
    g_l2, g_rms, fwd = d["grad_l2"], d["grad_rms"], d["fwd"]
    names = d["names"]
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ok = np.isfinite(g_rms) & (g_rms >= 0)
        top_l2 = np.nanmax(np.where(ok, g_l2, np.nan), axis=1, keepdims=True)
        top_rms = np.nanmax(np.where(ok, g_rms, np.nan), axis=1, keepdims=True)
        med_rms = np.nanmedian(np.where(ok, g_rms, np.nan), axis=1, keepdims=True)
        env_rms = _envelope(g_rms, fwd)
        env_l2 = _envelope(g_l2, fwd)
        ratios = {
            "V0 today: L2/max L2 < 1e-4 (med 5)": (g_l2 / top_l2, 1e-4, 5),
            "V1 rms/median rms < 1e-3 (med 5)": (g_rms / med_rms, 1e-3, 5),
            "V1b rms/median rms < 1e-3 (med 20)": (g_rms / med_rms, 1e-3, 20),
            "V2 upstream-envelope rms/median rms < 1e-3 (med 5)": (env_rms / med_rms, 1e-3, 5),
            "V2b upstream-envelope rms/max rms < 1e-4 (med 5)": (env_rms / top_rms, 1e-4, 5),
            "V3 upstream-envelope L2/max L2 < 1e-4 (med 5)": (env_l2 / top_l2, 1e-4, 5),
            "V3b upstream-envelope L2/max L2 < 1e-4 (med 20)": (env_l2 / top_l2, 1e-4, 20),
            "V3z as V3, exactly-zero envelope is not judged (blocked, not vanishing) [proposed]":
                (np.where(env_l2 > 0, env_l2, np.nan) / top_l2, 1e-4, 5),
        }
    out: dict[str, tuple[float, str]] = {}
    for rule, (r, thr, w) in ratios.items():
        med = _trailing_median(r, w)[warmup:]
        if not np.isfinite(med).any():
            out[rule] = (math.nan, "")
            continue
        per_stream = np.nanmin(med, axis=0)
        j = int(np.nanargmin(per_stream))
        with np.errstate(divide="ignore"):
            out[rule] = (float(np.log10(per_stream[j] / thr)) if per_stream[j] > 0 else -math.inf, names[j])
    # parameter update ratio (only modules that own parameters)
    ups = []
    for path, st in d["params"].items():
        u = st["update_ratio"][warmup:]
        if np.isfinite(u).any():
            ups.append((float(np.nanmedian(u)), path))
    if ups:
        v, p = min(ups)
        out["V4 median update ratio ||dW||/||W|| < 1e-5"] = (math.log10(v / 1e-5) if v > 0 else -math.inf, p)
    return out


def vanishing_fired(d: dict, thr: float = 1e-4, warmup: int = 5) -> list[str]:
    """Streams the proposed rule (V3z) fires on at any step after the warm-up."""
    with np.errstate(all="ignore"):
        top = np.nanmax(d["grad_l2"], axis=1, keepdims=True)
        env = _envelope(d["grad_l2"], d["fwd"])
        r = np.where(env > 0, env, np.nan) / top
        med = _trailing_median(r, 5)[warmup:]
        if med.shape[0] == 0:  # a run shorter than the warm-up
            return []
        worst = np.nanmin(med, axis=0)
    return [n for n, v in zip(d["names"], worst) if np.isfinite(v) and v < thr]


AFFINE_WORDS = ("Linear", "Conv", "BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm", "RMSNorm", "Embedding",
                "Bilinear")


def dead_table(d: dict) -> dict[str, Any]:
    """Today's rule and the proposals on one run: the worst window per stream."""
    types = dict(zip(d["names"], d["types"]))
    today, relu_only, const_fire = [], [], []
    per_type: dict[str, float] = {}
    per_type_const: dict[str, float] = {}
    relu_sizes: dict[str, tuple[float, str]] = {}
    for n, u in d["units"].items():
        if u["n_units"] < 4:
            continue
        t = types[n]
        dead = max((x for x in u["dead"] if x == x), default=0.0)
        const = max((x for x in u["const"] if x == x), default=0.0)
        per_type[t] = max(per_type.get(t, 0.0), dead)
        if t not in zoo.RELU_LIKE_NAMES:
            per_type_const[t] = max(per_type_const.get(t, 0.0), const)
        affine = any(w in t for w in AFFINE_WORDS) and t not in ("Sequential",)
        thr = 0.99 if affine else 0.5
        if t not in ("LogSoftmax", "LogSigmoid") and dead >= thr:
            today.append((n, t, dead))
        if t in zoo.RELU_LIKE_NAMES and zoo.proposed_dead_rule(u["n_units"], dead):
            relu_only.append((n, t, dead))
        if t in zoo.RELU_LIKE_NAMES:
            key = "ReLU-like, >= 16 units" if u["n_units"] >= 16 else "ReLU-like, 4-15 units"
            if dead >= relu_sizes.get(key, (-1.0, ""))[0]:
                relu_sizes[key] = (dead, f"{n} ({u['n_units']} units)")
        if t not in zoo.RELU_LIKE_NAMES and const >= 0.5:
            const_fire.append((n, t, const))
    return {"today": today, "relu_only": relu_only, "const": const_fire, "per_type_dead": per_type,
            "per_type_const": per_type_const, "relu_sizes": relu_sizes}


def fmt(x: float) -> str:
    if x != x:
        return "n/a"
    if x in (math.inf, -math.inf):
        return "-inf" if x < 0 else "inf"
    return f"{x:+.1f}"


def _names(lst: list, k: int = 3) -> str:
    if not lst:
        return "-"
    s = ", ".join(f"`{a}` ({b}, {c:.2f})" for a, b, c in lst[:k])
    return s + (f" +{len(lst) - k}" if len(lst) > k else "")


def evaluate(report: Path) -> None:
    healthy = sorted(p.stem[len("healthy_"):] for p in OUT.glob("healthy_*.pkl"))
    healthy = [n for n in zoo.ZOO if n in healthy]
    lines = ["<!-- tables generated by `python -m benchmarks.zoo_research evaluate` from the plain-PyTorch oracle "
             "(tests/zoo.py); no lit_probe code involved -->", ""]
    # models
    lines += ["### Models (healthy runs)", "",
              "| model | source | streams (calls/step) | steps | s, 60 steps + oracle | loss first -> last |",
              "|---|---|---:|---:|---:|---|"]
    data = {n: _load(f"healthy_{n}") for n in healthy}
    for n, d in data.items():
        e = zoo.ZOO[n]
        lines.append(f"| {n} | {e.source} | {len(d['names'])} | {len(d['steps'])} | {d['seconds']:.1f} | "
                     f"{d['losses'][0]:.3f} -> {d['losses'][-1]:.3f} |")
    # vanishing
    bug_v = {n: _load(f"bug_vanish_{n}") for n in ("tanh_mlp30", "tanh_mlp30_small_init", "sigmoid15")}
    bug_v = {k: v for k, v in bug_v.items() if v}
    other = {}
    for n in KILL_AT:
        b = _load(f"bug_dead_{n}")
        if b and "summary" in b:
            other[f"dead block {n}"] = b["summary"]
    b = _load("bug_dying_squeezenet")
    if b:
        other["squeezenet_dying"] = b["summary"]
    scores = {n: vanishing_scores(d) for n, d in {**data, **bug_v, **other}.items()}
    rules = list(next(iter(scores.values())).keys()) if scores else []
    lines += ["", "### Vanishing: log10 margin per model and rule", "",
              "margin = log10(min over streams and steps, after 5 warm-up steps, of the rule's statistic / its "
              "threshold): **> 0 silent, < 0 fires**. Healthy models must be > 0, the vanishing stacks < 0. "
              "Last rows: other bug runs, where a zero gradient behind a dead ReLU is not a vanishing gradient.", ""]
    short = [r.split(" ")[0] for r in rules]
    lines.append("| model | " + " | ".join(short) + " | V0 worst stream | V3z worst stream |")
    lines.append("|---|" + "---:|" * len(short) + "---|---|")
    for n, sc in scores.items():
        tag = f"**{n}** (vanishing)" if n in bug_v else (f"*{n}*" if n in other else n)
        row = [fmt(sc.get(r, (math.nan, ""))[0]) for r in rules]
        v0 = sc.get(rules[0], (0, ""))[1]
        v3 = next((sc[r][1] for r in rules if r.startswith("V3z ")), "")
        lines.append(f"| {tag} | " + " | ".join(row) + f" | `{v0}` | `{v3}` |")
    healthy_min = {r: min(scores[n][r][0] for n in data if r in scores[n]) for r in rules}
    bug_max = {r: max(scores[n][r][0] for n in bug_v if r in scores[n]) for r in rules} if bug_v else {}
    lines.append("| **healthy min / vanishing max** | " + " | ".join(
        f"{fmt(healthy_min[r])} / {fmt(bug_max.get(r, math.nan))}" for r in rules) + " | | |")
    lines += ["", "Rules (statistic per gradient stream and step; median over the last 5 or 20 steps):", ""]
    lines += [f"- **{r.split(' ')[0]}**: {r.split(' ', 1)[1]}" for r in rules]
    for n, d in bug_v.items():
        t = d["truth"]
        fired = vanishing_fired(d)
        lines.append(f"- oracle on `{n}`: vanishing={t['vanishing']} (bottom/top per-element gradient RMS <= "
                     f"{t['max_rms_ratio']:.1e}, bottom Linear update ratio <= {t['max_update_ratio']:.1e}, steps "
                     f"10-59); V3z fires on {len(fired)} of {len(d['names'])} streams: `{fired[0] if fired else '-'}` "
                     f"(input end) .. `{fired[-1] if fired else '-'}`")
    # dead
    lines += ["", "### Dead units: which streams each rule fires on (healthy zoo)", "",
              "Worst 20-step window per stream (windows start every 10 steps, 60 steps). Today = any module, "
              ">= 50% of units never positive (>= 99% for Linear/Conv/norm/Embedding leaves); proposed = ReLU/ReLU6 "
              "outputs only, > 50% in layers of >= 16 units, >= 90% in layers of 4-15 units; constant = non-ReLU "
              "outputs with >= 50% of units constant across samples AND steps.", "",
              "| model | today's rule | proposed ReLU-only rule | constant-unit rule |", "|---|---|---|---|"]
    per_type: dict[str, tuple[float, str]] = {}
    per_type_const: dict[str, tuple[float, str]] = {}
    relu_sizes: dict[str, tuple[float, str]] = {}
    for n, d in data.items():
        t = dead_table(d)
        lines.append(f"| {n} | {_names(t['today'])} | {_names(t['relu_only'])} | {_names(t['const'])} |")
        for ty, v in t["per_type_dead"].items():
            if v >= per_type.get(ty, (-1.0, ""))[0]:
                per_type[ty] = (v, n)
        for ty, v in t["per_type_const"].items():
            if v >= per_type_const.get(ty, (-1.0, ""))[0]:
                per_type_const[ty] = (v, n)
        for k, (v, where) in t["relu_sizes"].items():
            if v >= relu_sizes.get(k, (-1.0, ""))[0]:
                relu_sizes[k] = (v, f"{n}: {where}")
    lines += ["", "Margins of the proposed rule on the healthy zoo (worst window):", "",
              "| ReLU-like streams | max never-positive fraction | where | threshold |", "|---|---:|---|---:|"]
    for k in sorted(relu_sizes):
        thr = "> 0.50" if ">=" in k else ">= 0.90"
        lines.append(f"| {k} | {relu_sizes[k][0]:.2f} | {relu_sizes[k][1]} | {thr} |")
    lines += ["", "Max never-positive fraction and max constant-unit fraction per module type (healthy zoo, types "
              "with a non-zero value):", "", "| module type | max never positive | model | max constant | model |",
              "|---|---:|---|---:|---|"]
    for ty in sorted(per_type, key=lambda k: -per_type[k][0]):
        c = per_type_const.get(ty, (math.nan, ""))
        if per_type[ty][0] <= 0 and not c[0] > 0:
            continue
        lines.append(f"| {ty} | {per_type[ty][0]:.2f} | {per_type[ty][1]} | {fmt2(c[0])} | {c[1]} |")
    zero = sorted(ty for ty in per_type if per_type[ty][0] <= 0 and not per_type_const.get(ty, (0,))[0] > 0)
    lines += ["", f"Never positive 0.00 and constant 0.00 everywhere: {', '.join(zero)}."]
    # bugs
    lines += ["", "### Bugs: the oracle's answers", "",
              "#### One NaN injected into one module's output at step %d" % NAN_STEP, "",
              "| model | injected at | first non-finite activation call (step) | next calls (forward order) | "
              "first non-finite gradient (backward order, step) |", "|---|---|---|---|---|"]
    for n in zoo.ZOO:
        b = _load(f"bug_nan_{n}")
        if not b:
            continue
        fa, fg = b["first_activation"], b["first_gradient"]
        lines.append(f"| {n} | `{b['at']}` | `{fa[1] if fa else '-'}` ({fa[0] if fa else '-'}) | "
                     f"{', '.join(f'`{x}`' for x in b['nonfinite_calls'][1:3])} | `{fg[1] if fg else '-'}` "
                     f"({fg[0] if fg else '-'}) |")
    lines += ["", "#### Dead block (a BatchNorm bias at -10) and real dying", "",
              "| run | killed | first dead ReLU call, proposed rule (window end step, fraction) | ReLU calls dead "
              "over steps 0-19 | other streams >= 50% never positive | constant streams |",
              "|---|---|---|---|---|---|"]
    for n in zoo.ZOO:
        b = _load(f"bug_dead_{n}")
        if not b:
            continue
        fd = b.get("first_dead")
        relu = ", ".join(f"`{a}` ({f:.2f})" for a, f in b["relu_dead"][:3]) or "-"
        rel = {a for a, _ in b["relu_dead"]}
        oth = [a for a, _ in b["any_dead"] if a not in rel]
        lines.append(f"| {n} | `{b['at']}.bias` | `{fd[1]}` ({fd[0]}, {fd[2]:.2f}) | {relu} | "
                     f"{', '.join(f'`{a}`' for a in oth[:3])}{' ...' if len(oth) > 3 else ''} | "
                     f"{', '.join(f'`{a}`' for a, _ in b['constant'][:3])}{' ...' if len(b['constant']) > 3 else ''} |")
    b = _load("bug_dying_squeezenet")
    if b:
        fd = b["first_dead"]
        lines.append(f"| squeezenet_dying (dropout 0, SGD 0.01, nothing injected; loss {b['losses'][0]:.3f} -> "
                     f"{b['losses'][-1]:.4f}) | - | `{fd[1]}` ({fd[0]}, {fd[2]:.2f}) | | | |")
    b = _load("bug_lr50_resnet18")
    if b:
        lines += ["", "#### resnet18, SGD lr=50", "", f"losses: {', '.join(f'{x:.3g}' for x in b['losses'])}", "",
                  f"- first explosion (README rule: absmax > 1e6 or > 1000x running median after 5 steps), "
                  f"activations: `{b.get('first_exploding_activation')}`; gradients: "
                  f"`{b.get('first_exploding_gradient')}`",
                  f"- first non-finite activation: `{b['first_nonfinite_activation']}`; first non-finite gradient: "
                  f"`{b['first_nonfinite_gradient']}`", ""]
        lines += explode_lines(b)
    report.write_text("\n".join(lines) + "\n")
    print(f"wrote {report}")


def fmt2(x: float) -> str:
    return "n/a" if x != x else f"{x:.2f}"


def explode_lines(d: dict, absmax: float = 1e6, growth: float = 1e3, window: int = 50,
                  min_history: int = 5) -> list[str]:
    """README's documented exploding rule applied per call stream; first firing per step."""
    out = ["| step | loss | activation calls with absmax > 1e6 | first such call (forward order) | "
           "first growth > 1000x median call |", "|---:|---:|---:|---|---|"]
    A, F = d["act_absmax"], d["fwd"]
    for si, s in enumerate(d["steps"]):
        big = [j for j in range(A.shape[1]) if np.isfinite(A[si, j]) and A[si, j] > absmax]
        big.sort(key=lambda j: F[si, j])
        grow = []
        for j in range(A.shape[1]):
            hist = A[max(0, si - window):si, j]
            hist = hist[np.isfinite(hist)]
            if len(hist) >= min_history and np.median(hist) > 0 and np.isfinite(A[si, j]) and \
                    A[si, j] > growth * np.median(hist):
                grow.append(j)
        grow.sort(key=lambda j: F[si, j])
        loss = d["losses"][si] if si < len(d["losses"]) else math.nan
        out.append(f"| {s} | {loss:.3g} | {len(big)} | {('`' + d['names'][big[0]] + '`') if big else '-'} | "
                   f"{('`' + d['names'][grow[0]] + '`') if grow else '-'} |")
    return out


def main(argv: list[str] | None = None) -> None:
    global OUT
    ap = argparse.ArgumentParser(prog="python -m benchmarks.zoo_research", description=__doc__.split("\n\n")[0])
    ap.add_argument("cmd", choices=["time", "collect", "bugs", "evaluate", "all"])
    ap.add_argument("--models", default=",".join(zoo.ZOO))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="directory of the pickled runs (default: a fresh temporary one)")
    ap.add_argument("--report", default=None, help="the Markdown report (default: <out>/zoo_report.md)")
    ap.add_argument("--parts", default=",".join(BUG_PARTS), help="bug runs to do: " + ",".join(BUG_PARTS))
    a = ap.parse_args(argv)
    if a.cmd == "evaluate" and not a.out:
        ap.error("evaluate reads the runs of `collect`: give their directory with --out DIR")
    OUT = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="zoo_research_"))
    print(f"runs in {OUT}", flush=True)
    torch.set_num_threads(a.threads)
    models = [m for m in a.models.split(",") if m]
    if a.cmd == "time":
        time_models(models, 40)
    if a.cmd in ("collect", "all"):
        collect_healthy(models, a.steps)
    if a.cmd in ("collect", "bugs", "all"):
        collect_bugs(models, a.steps, tuple(a.parts.split(",")))
    if a.cmd in ("evaluate", "all"):
        evaluate(Path(a.report) if a.report else OUT / "zoo_report.md")


if __name__ == "__main__":
    main()
