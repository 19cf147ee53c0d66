"""LightningCLI entry point for the demo model and data, configured by YAML.

To run: python examples/train_cli.py fit --config configs/demo.yaml --config configs/probe.yaml

Other probe configs: configs/probe_versioned_wandb.yaml (versioned figures, offline W&B) and
configs/probe_large_model.yaml (block outputs only). Inject a bug with ``--model.bug dead-relu``; probe other
layers with ``--trainer.callbacks.init_args.probes='["block2.act", "block3.*"]'``.
"""

import importlib

from lit_probe.demo import DemoCNN, ShapesDataModule, pl


def main(args=None):
    # the demo's own Lightning package (lightning.pytorch when installed); the config file is rewritten on every
    # run so the documented command works again and again
    cli = importlib.import_module(f"{pl.__name__}.cli")  # lightning.pytorch.cli or pytorch_lightning.cli
    return cli.LightningCLI(DemoCNN, ShapesDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
