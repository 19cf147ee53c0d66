"""Whole-loop cost of a probe, measured with the machine's drift cancelled: one process per variant, taking turns.

On a shared or virtual machine the no-probe fits of one process drift by 10-25 % from one fit to the next (see the
README's tables), more than the few per cent a probe costs, so fit-against-fit ratios (``overhead.py --section
long``) cannot tell 1.04x from 1.10x there. Here every variant (no probe, the 8 residual blocks, every leaf) trains
in its own process at the same time, and a baton passes between them every ``--block`` steps: only one trains at
any moment, each sees the same machine within a second of the others, and its loop time is the sum of its own
blocks (each block: one ``on_train_batch_start`` to the one ``--block`` steps later, so every callback, log step
and figure step is counted; waiting for the baton is not). Each process has its own allocator and garbage
collector, as a real training does; a probe's drawing process keeps running (at its lowest priority) while the
others hold the baton, as it does beside a real training.

    python benchmarks/paired.py                         # resnet18 32x32 batch 16, 1,100 steps, 1 thread: ~5 min
    python benchmarks/paired.py --threads 2 --variants blocks   # every core (2 here)
    python benchmarks/paired.py --model mlp50 --steps 600 --variants net

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
    import overhead as ov
    from torch.utils.data import DataLoader

    pl = ov.pl
    n = len(sems)

    def pass_on() -> None:
        for k in range(1, n + 1):
            j = (i + k) % n
            if not done[j]:
                sems[j].release()
                return

    class Baton(pl.Callback):
        def __init__(self) -> None:
            self.blocks: list[float] = []
            self.t = 0.0
            self.end = 0.0

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            step = trainer.global_step
            if step == 0:
                sems[i].acquire()
            elif step % args["block"] == 0:
                self.blocks.append(time.perf_counter() - self.t)
                pass_on()
                sems[i].acquire()
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
    if variant == "none":
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
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=args["steps"], max_epochs=-1, logger=False,
                         log_every_n_steps=args["log_every"], callbacks=[*setup.callbacks, baton],
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=os.path.join(tmp, "trainer"))
    trainer.fit(model, DataLoader(data, batch_size=args["batch"], shuffle=False, drop_last=True))
    fit_end = time.perf_counter() - baton.end  # with the baton held: the probe's fit end (figures finished)
    findings = len(getattr(setup.probe, "findings", []) or []) if setup.probe is not None else 0
    done[i] = 1
    pass_on()
    ctx.close()
    shutil.rmtree(tmp, ignore_errors=True)
    out.put({"variant": variant, "modules": modules, "blocks": baton.blocks, "fit_end_s": fit_end,
             "findings": findings, "threads": torch.get_num_threads()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18", choices=["resnet18", "resnet50", "mlp50"])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=1100)
    p.add_argument("--block", type=int, default=10, help="steps a process trains before passing the baton")
    p.add_argument("--variants", default="blocks,leaves", help="blocks, leaves, net (mlp50's every module)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--figure-every", type=int, default=None, help="figure_every_n_steps (0: figures off; default: "
                   "FeatureProbe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", default=None)
    a = p.parse_args()
    variants = ["none"] + [v for v in a.variants.split(",") if v]
    args = {k: getattr(a, k) for k in ("model", "size", "batch", "steps", "block", "threads", "log_every", "seed",
                                                                            "figure_every")}
    spawn = mp.get_context("spawn")
    sems = [spawn.Semaphore(0) for _ in variants]
    done = spawn.Array("b", len(variants))
    out = spawn.Queue()
    load0 = os.getloadavg()
    t0 = time.perf_counter()
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
    import torch
    cores = os.cpu_count() or 1
    print(f"Machine: {cores} logical CPUs, torch {torch.__version__}, {a.threads} torch thread(s) per process, "
          f"load average {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}, {time.perf_counter() - t0:.0f} s")
    base = results["none"]["blocks"]
    print(f"\n**Paired whole loop**: {a.model}" + (f" {a.size}x{a.size}" if a.model != "mlp50" else "") +
          f" batch {a.batch}, {a.steps} steps, FeatureProbe default configuration, processes taking turns every "
          f"{a.block} steps; ratio = the variant's loop time / the no-probe process's; median = of the per-block "
          f"ratios (the first block, warm-up, excluded)\n")
    print("| variant | modules | loop s | mean step ms | ratio (whole loop) | median block ratio | fit end s | "
          "findings | target |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    lines = []
    for v in variants:
        r = results[v]
        loop = sum(r["blocks"])
        ratio = loop / sum(base)
        pairs = sorted(b / c for b, c in zip(r["blocks"][1:], base[1:]))
        med = pairs[len(pairs) // 2] if pairs else float("nan")
        key = (v, 1 if a.threads == 1 else ("cores" if a.threads >= cores else None))
        lim = TARGETS.get(key)
        tgt = "" if v == "none" or lim is None else f"<= {lim:.2f}x: {'met' if ratio <= lim else '**missed**'}"
        print(f"| {'no probe' if v == 'none' else v} | {r['modules']} | {loop:.1f} | {1e3 * loop / a.steps:.1f} | "
              f"{ratio:.3f}x | {med:.3f}x | {r['fit_end_s']:.2f} | {r['findings']} | {tgt} |")
        if lim is not None and v != "none":
            lines.append(f"- {'PASS' if ratio <= lim else 'MISS'}: {v} ({a.threads} thread(s)) <= {lim:.2f}x "
                         f"({ratio:.3f}x)")
    print("\nTargets:\n" + ("\n".join(lines) if lines else "- none for this configuration"))
    if a.json_path:
        with open(a.json_path, "w") as f:
            json.dump({"config": args, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
