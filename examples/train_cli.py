"""LightningCLI entry point for the demo model and data, configured by YAML.

To run: python examples/train_cli.py fit --config configs/demo.yaml --config configs/probe.yaml

Other probe configs: configs/probe_versioned_wandb.yaml (versioned figures, offline W&B) and
configs/probe_large_model.yaml (block outputs only). Inject a bug with ``--model.bug dead-relu``; probe other
layers with ``--trainer.callbacks.init_args.probes='["block2.act", "block3.*"]'``.
"""

from pytorch_lightning.cli import LightningCLI

from lit_probe.demo import DemoCNN, ShapesDataModule


def main(args=None) -> LightningCLI:
    return LightningCLI(DemoCNN, ShapesDataModule, args=args)


if __name__ == "__main__":
    main()
