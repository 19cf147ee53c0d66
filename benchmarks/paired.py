"""Whole-loop cost of a probe, measured with the machine's drift cancelled: one process per variant, taking turns.

On a shared or virtual machine the no-probe fits of one process drift by 10-25 % from one fit to the next (see the
README's tables), more than the few per cent a probe costs, so fit-against-fit ratios (``overhead.py --section
long``) cannot tell 1.04x from 1.10x there. Here every variant (no probe, a second no-probe process ``none2``, the 8
residual blocks, every leaf) trains in its own process at the same time, and a baton passes between them every
``--block`` steps: only one trains at any moment, each sees the same machine within a second of the others, and
its loop time is the sum of its own blocks (each block: one ``on_train_batch_start`` to the one ``--block`` steps
later, so every callback, log step and figure step is counted; waiting for the baton is not). Each process has its
own allocator and garbage collector, as a real training does.

One process runs up to 10-15 % faster or slower than another identical one for its whole life on this machine
(``none2`` against ``none``), so ``--rounds`` (3) rounds of fresh processes are run, who trains first rotating, a
probe's ratio is taken against the mean of the round's no-probe processes (``none`` and ``none2``), and the ratios
quoted are medians over the rounds; ``none2``'s own ratio (against ``none``) is the method's noise floor.

A probe's drawing process belongs to its variant's turn: when the training takes every core (``--threads`` >= the
cores; ``--pause-drawing auto``) it is stopped (SIGSTOP) while the baton is elsewhere and continued (SIGCONT) with
it, so it competes only with its own training, never with the no-probe process's turn (which would make the ratio
look better than it is). With fewer threads than cores it keeps drawing on the idle core, as it does beside a real
training.

    python benchmarks/paired.py                                        # resnet18 32x32 batch 16, 1,100 steps
    python benchmarks/paired.py --threads 2 --variants none2,blocks    # every core (2 here)
    python benchmarks/paired.py --model mlp50 --steps 600 --variants none2,net

Prints one Markdown table and each target as PASS / MISS. ``--json PATH`` writes every block's time.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

TARGETS = {("blocks", 1): 1.04, ("leaves", 1): 1.08, ("blocks", "cores"): 1.10, ("net", 1): 2.0}


def _worker(i: int, variant: str, args: dict[str, Any], sems: list[Any], done: Any, out: Any) -> None:
    import torch

    torch.set_num_threads(args["threads"])
    if args["pin"] is not None:  # this thread (the training's) on one CPU, the same for every variant
        os.sched_setaffinity(0, {args["pin"]})
    import overhead as ov
    from torch.utils.data import DataLoader

    pl = ov.pl
    n = len(sems)

    import signal

    probe_ref: list[Any] = []
    renderers: list[Any] = []

    def drawer_signal(sig: int) -> None:
        if not probe_ref:
            return
        run = getattr(probe_ref[0], "run", None)
        renderer = getattr(getattr(run, "output", None), "renderer", None)
        if renderer is not None:
            renderers[:] = [renderer]
        pid = getattr(renderer, "child_pid", None)
        if pid and args["pin"] is not None and sig == signal.SIGCONT:
            try:  # the drawing process on every CPU (it inherits the training thread's one at its start)
                os.sched_setaffinity(pid, range(os.cpu_count() or 1))
            except OSError:
                pass
        if pid and args["pause_drawing"]:
            try:
                os.kill(pid, sig)
            except OSError:
                pass

    def pass_on() -> None:
        drawer_signal(signal.SIGSTOP)
        for k in range(1, n + 1):
            j = (i + k) % n
            if not done[j]:
                sems[j].release()
                return

    def acquire() -> None:
        sems[i].acquire()
        drawer_signal(signal.SIGCONT)

    class Baton(pl.Callback):
        def __init__(self) -> None:
            self.blocks: list[float] = []
            self.t = 0.0
            self.end = 0.0

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            step = trainer.global_step
            if step == 0:
                acquire()
            elif step % args["block"] == 0:
                self.blocks.append(time.perf_counter() - self.t)
                pass_on()
                acquire()
            else:
                return
            self.t = time.perf_counter()

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.end = time.perf_counter()
            self.blocks.append(self.end - self.t)

    torch.manual_seed(args["seed"])
    arch = args["model"]
    net = ov.make_net(arch)
    model = ov.BenchModule(net)
    tmp = tempfile.mkdtemp(prefix=f"paired_{variant}_")
    ctx = ov.Context(tmp=tmp, device="cpu")
    fe = args["figure_every"]
    figs: Any = "default" if fe is None else (fe or None)
    if variant in ("none", "none2"):  # none2: a second no-probe process, the A/A check of the method
        setup, modules = ov.Setup(), 0
    elif variant == "blocks":
        modules = len(ov.block_names(model))
        setup = ov.feature_probe(ctx, [ov.BLOCKS_GLOB], "blocks", modules, figures=figs)
    elif variant == "leaves":
        names = ov.leaf_names(model)
        modules, setup = len(names), ov.feature_probe(ctx, names, "leaves", len(names), figures=figs)
    elif variant == "net":
        setup = ov.feature_probe(ctx, ["net.**"], "net", figures=figs)
        modules = sum(1 for _ in net.modules()) - 1
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    shape = ov.input_shape(arch, args["size"])
    data = ov.make_data(64 * args["batch"], shape)
    baton = Baton()
    if setup.probe is not None:
        probe_ref.append(setup.probe)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=args["steps"], max_epochs=-1, logger=False,
                         log_every_n_steps=args["log_every"], callbacks=[*setup.callbacks, baton],
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=os.path.join(tmp, "trainer"))
    trainer.fit(model, DataLoader(data, batch_size=args["batch"], shuffle=False, drop_last=True))
    fit_end = time.perf_counter() - baton.end  # with the baton held: the probe's fit end (figures finished)
    findings = len(getattr(setup.probe, "findings", []) or []) if setup.probe is not None else 0
    done[i] = 1
    probe_ref.clear()  # its drawing process has finished with fit end
    pass_on()
    ctx.close()
    pngs = sum(1 for _, _, files in os.walk(tmp) for f in files if f.endswith(".png"))
    not_drawn = renderers[0].skipped_summary() if renderers else []
    shutil.rmtree(tmp, ignore_errors=True)
    out.put({"variant": variant, "modules": modules, "blocks": baton.blocks, "fit_end_s": fit_end,
             "findings": findings, "threads": torch.get_num_threads(), "pngs": pngs, "not_drawn": not_drawn})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18", choices=["resnet18", "resnet50", "mlp50"])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=1100)
    p.add_argument("--block", type=int, default=10, help="steps a process trains before passing the baton")
    p.add_argument("--rounds", type=int, default=3, help="rounds of fresh processes (the figures are medians over "
                   "them: one process runs up to 10-15 %% faster or slower than another for its whole life here)")
    p.add_argument("--variants", default="none2,blocks,leaves",
                   help="blocks, leaves, net (mlp50's every module), none2 (a second no-probe process: what a ratio "
                   "of two identical processes is on this machine)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--figure-every", type=int, default=None, help="figure_every_n_steps (0: figures off; default: "
                   "FeatureProbe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pin", type=int, default=None, help="run every variant's training thread on this CPU")
    p.add_argument("--pause-drawing", choices=["auto", "yes", "no"], default="auto",
                   help="stop a variant's drawing process while another holds the baton (auto: when --threads "
                   "takes every core)")
    p.add_argument("--json", dest="json_path", default=None)
    a = p.parse_args()
    variants = ["none"] + [v for v in a.variants.split(",") if v]
    pause = a.pause_drawing == "yes" or (a.pause_drawing == "auto" and a.threads >= (os.cpu_count() or 1))
    args = {k: getattr(a, k) for k in ("model", "size", "batch", "steps", "block", "threads", "log_every", "seed",
                                                                            "figure_every")}
    args["pause_drawing"] = pause
    args["pin"] = a.pin
    spawn = mp.get_context("spawn")
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    rounds: list[dict[str, Any]] = []
    for rnd in range(a.rounds):
        order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]  # who trains first rotates
        rounds.append(_round(spawn, order, args))
    import torch
    cores = os.cpu_count() or 1
    print(f"Machine: {cores} logical CPUs, torch {torch.__version__}, {a.threads} torch thread(s) per process, "
          f"load average {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}, {time.perf_counter() - t0:.0f} s")
    print(f"\n**Paired whole loop**: {a.model}" + (f" {a.size}x{a.size}" if a.model != "mlp50" else "") +
          f" batch {a.batch}, {a.steps} steps, FeatureProbe default configuration" +
          ("" if a.figure_every is None else f" with figure_every_n_steps={a.figure_every or None}") +
          f"; {a.rounds} round(s) of fresh processes, in each the variants take turns every {a.block} steps (who "
          f"starts rotates), drawing processes {'paused' if pause else 'running'} outside their turn; ratio = the "
          "variant's loop time / the mean of the no-probe processes' of the same round (none2's: / none's); "
          "block ratio = the median of its per-block ratios (the first block, warm-up, excluded); none2 is a "
          "second no-probe process (what the method reads when nothing differs)\n")
    print("| variant | modules | mean step ms | ratio per round | **median ratio** | median block ratio | fit end s "
          "(max) | findings | target |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---|")
    lines = []
    for v in variants:
        ratios, meds = [], []
        for res in rounds:
            r = res[v]["blocks"]
            # the baseline: the no-probe processes of the round, averaged (none2 itself: against none alone)
            nones = [res[k]["blocks"] for k in ("none", "none2") if k in res and k != v] if v != "none" else \
                [res["none"]["blocks"]]
            base = [sum(col) / len(col) for col in zip(*nones)]
            ratios.append(sum(r) / sum(base))
            pairs = sorted(b / c for b, c in zip(r[1:], base[1:]))
            meds.append(pairs[len(pairs) // 2] if pairs else float("nan"))
        ratio, med = _median(ratios), _median(meds)
        step = _median([1e3 * sum(res[v]["blocks"]) / a.steps for res in rounds])
        key = (v, 1 if a.threads == 1 else ("cores" if a.threads >= cores else None))
        lim = TARGETS.get(key)
        tgt = "" if v.startswith("none") or lim is None else \
            f"<= {lim:.2f}x: {'met' if ratio <= lim else '**missed**'}"
        print(f"| {'no probe' if v == 'none' else v} | {rounds[0][v]['modules']} | {step:.1f} | "
              f"{', '.join(f'{x:.3f}' for x in ratios)} | {ratio:.3f}x | {med:.3f}x | "
              f"{max(res[v]['fit_end_s'] for res in rounds):.2f} | {max(res[v]['findings'] for res in rounds)} | "
              f"{tgt} |")
        if lim is not None and not v.startswith("none"):
            lines.append(f"- {'PASS' if ratio <= lim else 'MISS'}: {v} ({a.threads} thread(s)) <= {lim:.2f}x "
                         f"(median of {a.rounds}: {ratio:.3f}x)")
    for v in variants:
        if v.startswith("none"):
            continue
        drawn = [res[v]["pngs"] for res in rounds]
        missing = sorted({x for res in rounds for x in res[v]["not_drawn"]})
        print(f"\n{v}: figure files written per round {drawn}" + ("" if not missing else
                                                                  "; not drawn: " + "; ".join(missing)))
    print("\nTargets:\n" + ("\n".join(lines) if lines else "- none for this configuration"))
    if a.json_path:
        with open(a.json_path, "w") as f:
            json.dump({"config": args, "rounds": rounds}, f, indent=1)


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return float("nan") if n == 0 else (xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2]))


def _round(spawn: Any, variants: list[str], args: dict[str, Any]) -> dict[str, Any]:
    """One process per variant, the first of ``variants`` trains first; every variant's result by name."""
    sems = [spawn.Semaphore(0) for _ in variants]
    done = spawn.Array("b", len(variants))
    out = spawn.Queue()
    procs = [spawn.Process(target=_worker, args=(i, v, args, sems, done, out)) for i, v in enumerate(variants)]
    for pr in procs:
        pr.start()
    sems[0].release()  # the first variant starts; each passes the baton on every --block steps
    results = {}
    for _ in procs:
        r = out.get()
        results[r["variant"]] = r
    for pr in procs:
        pr.join()
    return results


if __name__ == "__main__":
    main()
