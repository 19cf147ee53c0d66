"""The one-line use: add ``FeatureProbe`` to the Trainer's callbacks.

To run: python examples/plain_callback.py --out lit_probe_runs/plain --steps 30

Trains the bundled demo CNN (``--bug dead-relu`` injects a dead ReLU in ``block2``) and prints what the probe
found; figures, ``summary.md`` and ``findings.jsonl`` land in ``<out>/probe``.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl  # the unified package; `import pytorch_lightning as pl` works the same

from lit_probe import FeatureProbe
from lit_probe.demo import BUGS, DemoCNN, ShapesDataModule


def main(argv: list[str] | None = None) -> FeatureProbe:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="lit_probe_runs/plain", help="output directory")
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    parser.add_argument("--bug", choices=BUGS, default="dead-relu")
    args = parser.parse_args(argv)

    probe = FeatureProbe(probes=["stem", "block2.act", "block3.*"])  # <- the one line
    trainer = pl.Trainer(max_steps=args.steps, callbacks=[probe], default_root_dir=args.out, logger=False,
                         enable_checkpointing=False, limit_val_batches=0, log_every_n_steps=5,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(DemoCNN(bug=args.bug), datamodule=ShapesDataModule())

    for f in probe.findings:
        print(f"step {f.step:>4}  {f.layer:<16} {f.signal:<10} {f.kind}")
    print(f"{len(probe.findings)} finding(s); summary: {probe.out_dir}/summary.md")
    return probe


if __name__ == "__main__":
    main()
