#!/usr/bin/env python
"""Data for two per-layer parameter detectors ("not learning", "lr too high") on the zoo of real models.

Per module that owns parameters (own parameters only, ``requires_grad`` only; the model's root module included),
per optimizer step: ||W|| before the step, ||g||, and the update ratio r = ||W_after - W_before|| / ||W_before||,
all from the plain-PyTorch oracle (``tests/zoo.Oracle.param_grads`` / ``param_updates``). No lit_probe code runs.

Rules judged (per step; median over modules with ||W|| > 0 and finite r, at least 3 of them):

* not learning: r_m < A x median(r), or r_m == 0 exactly while ||g_m|| > 0, for W consecutive steps;
* lr too high: r_m > B x median(r) or r_m > C, for W consecutive steps.

Modules with ||W|| == 0 are not judged. Runs: every healthy ``ZOO`` entry as configured, resnet18 / tv_vit /
hf_bert with SGD lr=0.01 momentum 0.9, and resnet18 (64x64, batch 8) with Adam 1e-3 or SGD 0.01 where
``layer3``'s parameters are in their own group with lr x0, x10, x100 (and x1 as the baseline).

Run it from the repository root as a module (``tests.zoo`` is imported as a package path):

    python -m benchmarks.param_research                 # everything (~5-8 min on one core)
    python -m benchmarks.param_research --models tv_vit,hf_bert --sgd-models "" --no-bugs --steps 10
    python -m benchmarks.param_research --out DIR --reuse --growth    # evaluate DIR's cached runs again

The raw per-step arrays are pickled to ``<out>/param_research.pkl``; ``--out`` defaults to a fresh
``tempfile.mkdtemp()`` (printed).
"""

from __future__ import annotations

import argparse
import itertools
import math
import pickle
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

try:
    from tests import zoo
except ImportError as err:  # run as a script, or from another directory
    raise SystemExit("run from the repository root: python -m benchmarks.param_research ...") from err

A_CANDIDATES = (1e-3,)
B_CANDIDATES = (10.0, 30.0, 100.0)
C_CANDIDATES = (0.1, 0.3, 1.0)
W_CANDIDATES = (3, 5)
WARM = 5  # steps 0..WARM-1 reported separately (Adam's first steps are sign-like)
BUG_MODULE = "layer3"


# --------------------------------------------------------------------------------------------------- run
def run(entry: zoo.ZooEntry, steps: int, seed: int = 0, group: tuple[str, float] | None = None,
        time_cap: float = 60.0) -> dict[str, Any]:
    """Plain training loop (as ``zoo.train_plain``) with only the oracle's parameter statistics.

    The oracle is attached to a wrapper so that the model's root module (timm/torchvision ViT tokens) is
    covered; its forward hooks are removed at once (``param_grads``/``param_updates`` only need the paths).
    ``group=(prefix, factor)`` puts the parameters under ``prefix`` in their own group with lr x factor."""
    torch.manual_seed(seed)
    net = entry.build()
    net.train()
    holder = nn.ModuleDict({"net": net})
    orc = zoo.Oracle(holder, units=False).attach()
    orc.detach()
    if group is None:
        opt = zoo.make_optimizer(entry, net.parameters())
    else:
        prefix, factor = group
        inside = [p for n, p in net.named_parameters() if n.startswith(prefix + ".")]
        rest = [p for n, p in net.named_parameters() if not n.startswith(prefix + ".")]
        opt = zoo.make_optimizer(entry, [{"params": rest}, {"params": inside, "lr": entry.lr * factor}])
    batches = zoo.make_batches(entry)
    losses: list[float] = []
    t0 = time.perf_counter()
    truncated = False
    for step in range(steps):
        orc.begin_step(step)
        x, y = batches[step % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = zoo.compute_loss(entry, net, x, y)
        loss.backward()
        orc.param_grads()
        opt.step()
        orc.param_updates()
        losses.append(float(loss.detach()))
        if time.perf_counter() - t0 > time_cap and step + 1 < steps:
            truncated = True
            break
    dt = time.perf_counter() - t0
    S = len(orc.steps)
    paths = list(orc.steps[0].params)
    R, G, Wn = (np.full((S, len(paths)), np.nan) for _ in range(3))
    for s in range(S):
        for j, p in enumerate(paths):
            st = orc.steps[s].params.get(p)
            if st:
                R[s, j], G[s, j], Wn[s, j] = st.get("update_ratio", np.nan), st["grad_norm"], st["param_norm"]
    names = [p[len("net."):] if p.startswith("net.") else "(root)" for p in paths]
    return {"R": R, "G": G, "W": Wn, "names": names, "losses": losses, "seconds": dt, "truncated": truncated}


# ------------------------------------------------------------------------------------------------- rules
def step_median(d: dict) -> np.ndarray:
    R, Wn = d["R"], d["W"]
    ok = (Wn > 0) & np.isfinite(R)
    med = np.full(R.shape[0], np.nan)
    for s in range(R.shape[0]):
        v = R[s, ok[s]]
        if v.size >= 3:
            m = float(np.median(v))
            med[s] = m if m > 0 else np.nan
    return med


def ratios(d: dict) -> np.ndarray:
    """r / step median; NaN where not judged (||W|| == 0, r non-finite, no median)."""
    R, Wn = d["R"], d["W"]
    with np.errstate(all="ignore"):
        q = R / step_median(d)[:, None]
    return np.where((Wn > 0) & np.isfinite(R), q, np.nan)


def low_flags(d: dict, A: float) -> np.ndarray:
    q = ratios(d)
    with np.errstate(invalid="ignore"):
        return (d["W"] > 0) & ((q < A) | ((d["R"] == 0) & (d["G"] > 0)))


def high_flags(d: dict, B: float, C: float) -> np.ndarray:
    q = ratios(d)
    with np.errstate(invalid="ignore"):
        return (d["W"] > 0) & ((q > B) | (d["R"] > C))


def first_fire(f: np.ndarray, W: int) -> np.ndarray:
    """Per module: the step at which it has been flagged W consecutive steps (-1: never)."""
    out = np.full(f.shape[1], -1)
    run_ = np.zeros(f.shape[1], dtype=int)
    for s in range(f.shape[0]):
        run_ = np.where(f[s], run_ + 1, 0)
        hit = (run_ >= W) & (out < 0)
        out[hit] = s
    return out


def window_extreme(x: np.ndarray, W: int, high: bool) -> np.ndarray:
    """Per module: the largest (high) min over any W-step window of x, or the smallest max (not high); i.e. the
    threshold beyond which a "> thr for W steps" / "< thr for W steps" rule starts to fire. NaN in a window breaks
    it."""
    S, M = x.shape
    out = np.full(M, -np.inf if high else np.inf)
    for s in range(W - 1, S):
        blk = x[s - W + 1:s + 1]
        ok = np.isfinite(blk).all(0)
        v = blk.min(0) if high else blk.max(0)
        out = np.where(ok, np.maximum(out, v) if high else np.minimum(out, v), out)
    return out


def summary(d: dict) -> dict[str, Any]:
    q = ratios(d)
    R = np.where((d["W"] > 0) & np.isfinite(d["R"]), d["R"], np.nan)
    qpos = np.where(d["G"] > 0, q, np.nan)  # min ratio: modules that got a gradient
    out: dict[str, Any] = {}
    for tag, sl in (("early", slice(0, WARM)), ("late", slice(WARM, None))):
        blk_q, blk_p, blk_r = q[sl], qpos[sl], R[sl]
        if not np.isfinite(blk_q).any():
            out[tag] = (math.nan, math.nan, math.nan, "", "")
            continue
        jmax = int(np.nanargmax(np.nanmax(blk_q, 0)))
        jmin = int(np.nanargmin(np.nanmin(blk_p, 0))) if np.isfinite(blk_p).any() else 0
        out[tag] = (float(np.nanmax(blk_q)), float(np.nanmin(blk_p)) if np.isfinite(blk_p).any() else math.nan,
                    float(np.nanmax(blk_r)), d["names"][jmax], d["names"][jmin])
    out["zero_with_grad"] = int(((d["R"] == 0) & (d["G"] > 0) & (d["W"] > 0)).sum())
    out["n_zero_w"] = int((d["W"][0] == 0).sum())
    w0 = d["W"][0]
    with np.errstate(all="ignore"):
        out["wgrow"] = float(np.nanmax(np.where(w0 > 0, d["W"][-1] / w0, np.nan)))
    for W in W_CANDIDATES:
        b = window_extreme(q, W, True)
        c = window_extreme(R, W, True)
        a = window_extreme(q, W, False)
        out[f"B*{W}"], out[f"C*{W}"], out[f"A*{W}"] = float(b.max()), float(c.max()), float(a.min())
        out[f"B*{W}_at"] = d["names"][int(b.argmax())]
        out[f"B*{W}late"] = float(window_extreme(q[WARM:], W, True).max())
        out[f"C*{W}late"] = float(window_extreme(R[WARM:], W, True).max())
        out[f"C*{W}_at"] = d["names"][int(c.argmax())]
    return out


def g(x: float) -> str:
    if x != x:
        return "-"
    if x in (math.inf, -math.inf):
        return "inf" if x > 0 else "-inf"
    return f"{x:.2g}" if abs(x) < 1e4 else f"{x:.0e}"


# ------------------------------------------------------------------------------------------------- main
BUG_COMBOS = ((30.0, 0.3), (100.0, 0.3), (100.0, 1.0))


def collect(a: argparse.Namespace) -> tuple[dict[str, dict], dict[str, dict]]:
    runs: dict[str, dict] = {}
    for name in [m for m in a.models.split(",") if m]:
        e = zoo.ZOO[name]
        runs[f"{name}|{e.optimizer} {e.lr:g}"] = run(e, a.steps, time_cap=a.time_cap)
        print(f"  {name}: {runs[f'{name}|{e.optimizer} {e.lr:g}']['seconds']:.1f}s", file=sys.stderr, flush=True)
    for name in [m for m in a.sgd_models.split(",") if m]:
        e = replace(zoo.ZOO[name], optimizer="sgd", lr=0.01)
        runs[f"{name}|sgd 0.01"] = run(e, a.steps, time_cap=a.time_cap)
    bugs: dict[str, dict] = {}
    if not a.no_bugs:
        base = zoo.ZOO["resnet18"]
        for opt, lr in (("adam", 1e-3), ("sgd", 0.01)):
            e = replace(base, input_shape=(3, a.bug_size, a.bug_size), batch_size=8, optimizer=opt, lr=lr)
            for factor in (1.0, 0.0, 10.0, 100.0, 1000.0):
                bugs[f"{opt} {lr:g}, layer3 lr x{factor:g}"] = run(e, a.bug_steps, group=(BUG_MODULE, factor),
                                                                   time_cap=10 * a.time_cap)
                print(f"  bug {opt} x{factor:g}: {bugs[f'{opt} {lr:g}, layer3 lr x{factor:g}']['seconds']:.1f}s",
                      file=sys.stderr, flush=True)
        bugs["resnet18_lr50 (zoo BUG_MODELS, 32x32, SGD lr=50, all modules)"] = run(
            zoo.BUG_MODELS["resnet18_lr50"], 12, time_cap=a.time_cap)
    return runs, bugs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.param_research", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(zoo.ZOO))
    ap.add_argument("--sgd-models", default="resnet18,tv_vit,hf_bert", help="also run with SGD lr=0.01 m=0.9")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--bug-steps", type=int, default=20)
    ap.add_argument("--bug-size", type=int, default=64)
    ap.add_argument("--no-bugs", action="store_true")
    ap.add_argument("--time-cap", type=float, default=60.0, help="seconds per run; longer runs are cut")
    ap.add_argument("--verbose", action="store_true", help="worst modules per model")
    ap.add_argument("--out", default=None, help="directory of param_research.pkl, the raw per-step arrays "
                                                "(default: a fresh temporary one)")
    ap.add_argument("--reuse", action="store_true", help="evaluate the cached runs of --out, do not train")
    ap.add_argument("--growth", action="store_true",
                    help="append the weight-growth / cumulative-movement / group-relative section")
    a = ap.parse_args(argv)
    if a.reuse and not a.out:
        ap.error("--reuse evaluates cached runs: give their directory with --out DIR")
    torch.set_num_threads(1)
    t_all = time.perf_counter()

    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="param_research_"))
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "param_research.pkl"
    if a.reuse and cache.exists():
        with open(cache, "rb") as f:
            runs, bugs = pickle.load(f)
    else:
        runs, bugs = collect(a)
        with open(cache, "wb") as f:
            pickle.dump((runs, bugs), f)
    print(f"collected in {time.perf_counter() - t_all:.0f}s (cache {cache})")

    print(f"## healthy runs ({a.steps} steps; ratio = r / step median of r; 'early' = steps 0-{WARM - 1}, "
          f"'late' = steps >= {WARM})")
    print("B*3l/C*3l: same, W=3, steps >= 5 only; Wgrow: max over modules of ||W_last|| / ||W_0||; "
          "0r,g>0: (module, step) with r == 0 and ||g|| > 0; W=0: modules with ||W_0|| == 0")
    print("B*W / C*W / A*W: the threshold at which the '> B x med' / '> C' / '< A x med' rule first fires with W "
          "consecutive steps (fires iff B < B*, C < C*, A > A*)")
    hdr = (f"{'model|opt lr':34s} {'s':>5s} {'mods':>4s} | {'e.max/med':>9s} {'e.min/med':>9s} {'e.max r':>7s} | "
           f"{'l.max/med':>9s} {'l.min/med':>9s} {'l.max r':>7s} | {'B*3':>6s} {'B*5':>6s} {'C*3':>6s} "
           f"{'C*5':>6s} {'A*3':>7s} {'A*5':>7s} | {'B*3l':>6s} {'C*3l':>6s} {'Wgrow':>6s} | 0r,g>0 W=0")
    print(hdr)
    sums = {}
    for key, d in runs.items():
        sm = sums[key] = summary(d)
        e, l_ = sm["early"], sm["late"]
        cut = "*" if d["truncated"] else ""
        print(f"{key:34s} {d['seconds']:5.1f}{cut} {len(d['names']):4d} | {g(e[0]):>9s} {g(e[1]):>9s} "
              f"{g(e[2]):>7s} | {g(l_[0]):>9s} {g(l_[1]):>9s} {g(l_[2]):>7s} | {g(sm['B*3']):>6s} "
              f"{g(sm['B*5']):>6s} {g(sm['C*3']):>6s} {g(sm['C*5']):>6s} {g(sm['A*3']):>7s} {g(sm['A*5']):>7s} | "
              f"{g(sm['B*3late']):>6s} {g(sm['C*3late']):>6s} {g(sm['wgrow']):>6s} | "
              f"{sm['zero_with_grad']:6d} {sm['n_zero_w']:3d}")
    if a.verbose:
        print("\nworst modules (late max/med, late min/med, B*3 at, C*3 at):")
        for key, sm in sums.items():
            print(f"  {key}: {sm['late'][3]} | {sm['late'][4]} | {sm['B*3_at']} | {sm['C*3_at']}")

    print("\n## false alarms on healthy runs: combos that fire (models: modules fired)")
    for W in W_CANDIDATES:
        for A in A_CANDIDATES:
            hits = [f"{k.split('|')[0]}{'/sgd' if 'sgd 0.01' in k else ''}:{int((first_fire(low_flags(d, A), W) >= 0).sum())}"
                    for k, d in runs.items() if (first_fire(low_flags(d, A), W) >= 0).any()]
            print(f"  low  A={A:g} W={W}: {', '.join(hits) or 'none'}")
        for B, C in itertools.product(B_CANDIDATES, C_CANDIDATES):
            hits = []
            for k, d in runs.items():
                ff = first_fire(high_flags(d, B, C), W)
                if (ff >= 0).any():
                    hits.append(f"{k.split('|')[0]}{'/sgd' if 'sgd 0.01' in k else ''}:{int((ff >= 0).sum())}")
            print(f"  high B={B:g} C={C:g} W={W}: {', '.join(hits) or 'none'}")

    if not a.no_bugs:
        print(f"\n## injected: resnet18 {a.bug_size}x{a.bug_size}, batch 8, {a.bug_steps} steps, `{BUG_MODULE}`'s params "
              f"in their own group with lr x factor")
        print("per rule: layer3 convs fired/5 @first step, layer3 BNs fired/5, +N other modules fired. B*/C*: "
              "the largest B / C at which ALL layer3 convs (BNs) fire | smallest at which no other module fires")
        for key, d in bugs.items():
            in3 = np.array([n.startswith(BUG_MODULE + ".") for n in d["names"]])
            if "lr50" in key:
                in3 = np.ones(len(d["names"]), dtype=bool)
            conv = in3 & np.array([_is_conv(n) for n in d["names"]])
            bn = in3 & ~conv
            q = ratios(d)
            R = np.where((d["W"] > 0) & np.isfinite(d["R"]), d["R"], np.nan)
            loss = d["losses"]
            if "lr50" in key:
                print(f"{key}: losses {' '.join(g(x) for x in loss)}")
                for W in W_CANDIDATES:
                    parts = []
                    for B, C in BUG_COMBOS:
                        ff = first_fire(high_flags(d, B, C), W)
                        parts.append(f"B{g(B)}|C{g(C)} {int((ff >= 0).sum())}/{len(ff)}"
                                     + (f"@{ff[ff >= 0].min()}" if (ff >= 0).any() else ""))
                    print(f"  W={W}: " + "; ".join(parts))
                continue
            print(f"{key} ({d['seconds']:.0f}s, loss {loss[0]:.2f}->{loss[-1]:.3g}; median r: l3 conv "
                  f"{g(float(np.nanmedian(R[:, conv])))}, l3 bn {g(float(np.nanmedian(R[:, bn])))}, others "
                  f"{g(float(np.nanmedian(R[:, ~in3])))})")
            for W in W_CANDIDATES:
                parts = [_fired(f"low A={A_CANDIDATES[0]:g}", first_fire(low_flags(d, A_CANDIDATES[0]), W), conv, bn)]
                for B, C in BUG_COMBOS:
                    parts.append(_fired(f"B{g(B)}|C{g(C)}", first_fire(high_flags(d, B, C), W), conv, bn))
                b, c = window_extreme(q, W, True), window_extreme(R, W, True)
                parts.append(f"B* {g(float(b[conv].min()))}({g(float(b[bn].min()))})|{g(float(b[~in3].max()))} "
                             f"C* {g(float(c[conv].min()))}({g(float(c[bn].min()))})|{g(float(c[~in3].max()))}")
                print(f"  W={W}: " + "; ".join(parts))
    if a.growth:
        growth_section(runs, bugs, a)
    print(f"\ntotal {time.perf_counter() - t_all:.0f}s")


def _is_conv(name: str) -> bool:
    last = name.split(".")[-1]
    return last.startswith("conv") or (name.endswith("downsample.0"))


def _fired(tag: str, ff: np.ndarray, conv: np.ndarray, bn: np.ndarray) -> str:
    hc, hb = ff[conv][ff[conv] >= 0], ff[bn][ff[bn] >= 0]
    first = f"@{min(np.concatenate([hc, hb]))}" if hc.size + hb.size else ""
    return f"{tag} {hc.size}/{int(conv.sum())}{first} bn {hb.size} +{int((ff[~(conv | bn)] >= 0).sum())}"


# ------------------------------------------------------------------------------------------------ growth
F_CANDIDATES = (1e-3, 1e-2, 3e-2)
T_CANDIDATES = (3.0, 5.0, 10.0)
K_GROWTH = 3
GB_CANDIDATES = (5.0, 10.0, 30.0)


def _entry_for(key: str, a: argparse.Namespace) -> zoo.ZooEntry:
    if "lr50" in key:
        return zoo.BUG_MODELS["resnet18_lr50"]
    if "|" in key:
        return zoo.ZOO[key.split("|")[0]]
    return replace(zoo.ZOO["resnet18"], input_shape=(3, a.bug_size, a.bug_size), batch_size=8)


def module_numels(entry: zoo.ZooEntry, names: list[str]) -> np.ndarray:
    """Own ``requires_grad`` parameter count per cached module name (the cache does not store it)."""
    torch.manual_seed(0)
    net = entry.build()
    out = []
    for n in names:
        m = net if n == "(root)" else net.get_submodule(n)
        out.append(sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad))
    return np.array(out, dtype=float)


def growth_arrays(d: dict, numel: np.ndarray, f: float) -> tuple[np.ndarray, np.ndarray]:
    """G_t = ||W_t|| / den and S_t = sum_{s<=t} ||dW_s|| / den, den = max(||W_0||, f sqrt(numel)).

    ||dW_s|| = r_s ||W_s||; where ||W_s|| == 0 it is ||W_{s+1}|| (exact). S_t bounds ||W_{t+1} - W_0|| / den from
    above (triangle inequality); G_t is the norm before step t. Non-finite values stay NaN (they break a run)."""
    Wn, R = d["W"], d["R"]
    den = np.maximum(Wn[0], f * np.sqrt(numel))
    with np.errstate(all="ignore"):
        G = Wn / den
        dW = np.where(Wn > 0, R * Wn, np.nan)
        nxt = np.vstack([Wn[1:], np.full((1, Wn.shape[1]), np.nan)])
        dW = np.where(Wn == 0, nxt, dW)
        dW = np.where(np.isfinite(dW), dW, np.nan)
        S = np.cumsum(np.nan_to_num(dW, nan=0.0), 0)
        S = np.where(np.isnan(dW) & (Wn != 0), np.nan, S) / den
    return G, S


def group_ratio(d: dict, inside: np.ndarray) -> np.ndarray:
    """Per step: median r over the group's modules / median r over the others (||W|| > 0, finite r)."""
    R, Wn = d["R"], d["W"]
    ok = (Wn > 0) & np.isfinite(R)
    out = np.full(R.shape[0], np.nan)
    for s in range(R.shape[0]):
        a_, b_ = R[s, ok[s] & inside], R[s, ok[s] & ~inside]
        if a_.size and b_.size and np.median(b_) > 0:
            out[s] = float(np.median(a_) / np.median(b_))
    return out


def growth_section(runs: dict[str, dict], bugs: dict[str, dict], a: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    K = K_GROWTH
    numels: dict[str, np.ndarray] = {}
    for key, d in itertools.chain(runs.items(), bugs.items()):
        numels[key] = module_numels(_entry_for(key, a), d["names"])
    print(f"\n## growth (numel from rebuilt models, {time.perf_counter() - t0:.0f}s). G_t = ||W_t||/den, "
          f"S_t = sum_(s<=t) ||dW_s||/den (upper bound of ||W_t+1 - W_0||/den), den = max(||W_0||, f sqrt(numel)); "
          f"fires when > T for K={K} consecutive steps")
    print("G*/S*: the largest T at which the rule fires (K-step window min, max over modules); module at the max")
    short = {k: k.split("|")[0] + ("/sgd" if "sgd 0.01" in k else "") for k in runs}
    for kind in ("G", "S"):
        print(f"\n### {kind}: healthy runs, {kind}* per f (fires iff T < {kind}*)")
        print(f"{'run':28s} " + " ".join(f"{'f=' + g(f):>30s}" for f in F_CANDIDATES))
        for key, d in runs.items():
            cells = []
            for f in F_CANDIDATES:
                x = growth_arrays(d, numels[key], f)[kind == "S"]
                w = window_extreme(x, K, True)
                j = int(np.nanargmax(np.where(np.isfinite(w), w, -np.inf)))
                cells.append(f"{g(float(w[j])):>6s} {d['names'][j][-23:]:>23s}")
            print(f"{short[key]:28s} " + " ".join(cells))
        print(f"{kind} false alarms (healthy runs with a module firing, modules fired):")
        for f, T in itertools.product(F_CANDIDATES, T_CANDIDATES):
            hits = []
            for key, d in runs.items():
                x = growth_arrays(d, numels[key], f)[kind == "S"]
                ff = first_fire(np.nan_to_num(x, nan=-np.inf) > T, K)
                if (ff >= 0).any():
                    hits.append(f"{short[key]}:{int((ff >= 0).sum())}")
            print(f"  f={g(f)} T={g(T)}: {', '.join(hits) or 'none'}")
        print(f"{kind} on injected runs: per (f, T) layer3 modules fired/n @first step, +other modules fired; "
              f"{kind}*: min over layer3 convs (min over all layer3)..max over layer3 | max over others")
        for key, d in bugs.items():
            in3 = np.array([n.startswith(BUG_MODULE + ".") for n in d["names"]])
            conv = in3 & np.array([_is_conv(n) for n in d["names"]])
            parts = []
            for f in F_CANDIDATES:
                x = growth_arrays(d, numels[key], f)[kind == "S"]
                w = window_extreme(x, K, True)
                fired = []
                for T in T_CANDIDATES:
                    ff = first_fire(np.nan_to_num(x, nan=-np.inf) > T, K)
                    h3, ho = ff[in3 & (ff >= 0)], ff[~in3 & (ff >= 0)]
                    at = f"@{int(min(np.concatenate([h3, ho])))}" if h3.size + ho.size else ""
                    fired.append(f"T{g(T)} {h3.size}/{int(in3.sum())}{at}+{ho.size}")
                parts.append(f"f={g(f)}: " + " ".join(fired)
                             + f" {kind}* {g(float(w[conv].min()))}({g(float(w[in3].min()))})..{g(float(w[in3].max()))}"
                             f"|{g(float(w[~in3].max()))}")
            print(f"  {key[:40]}")
            for p in parts:
                print(f"      {p}")

    print(f"\n### group-relative: q_t = median r(layer3 group) / median r(other group), fires when > B for K={K} steps")
    print("q over steps: min / median / max; q*: largest B that fires (K-step window min); first step per B; "
          "also late = steps >= 5 only")
    for key, d in bugs.items():
        if "lr50" in key:
            continue
        in3 = np.array([n.startswith(BUG_MODULE + ".") for n in d["names"]])
        q = group_ratio(d, in3)
        fires = []
        for B in GB_CANDIDATES:
            ff = first_fire(np.nan_to_num(q, nan=-np.inf)[:, None] > B, K)[0]
            fires.append(f"B{g(B)}@{ff}" if ff >= 0 else f"B{g(B)} -")
        qs = float(window_extreme(q[:, None], K, True)[0])
        ql = float(window_extreme(q[WARM:, None], K, True)[0])
        print(f"  {key:28s} q {g(float(np.nanmin(q)))}/{g(float(np.nanmedian(q)))}/{g(float(np.nanmax(q)))} "
              f"q* {g(qs)} (late {g(ql)}) | " + " ".join(fires)
              + " | q_t " + " ".join(g(float(v)) for v in q))
    print(f"growth section {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
