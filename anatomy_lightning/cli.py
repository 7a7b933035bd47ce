"""`python -m anatomy_lightning fit|validate|test --config configs/X.yaml`.

A thin `LightningCLI`: the model is always `GRPOModule`, the data always `AnatomyVQADataModule`;
callbacks (curriculum, augmentation, checkpoints) come from the YAML. Configs are parsed in
omegaconf mode, so `${model.num_generations}`-style interpolation works.
"""

from __future__ import annotations

import logging
import os
import sys

from lightning.pytorch.cli import LightningCLI

from anatomy_lightning.data.datamodule import AnatomyVQADataModule
from anatomy_lightning.module import GRPOModule


class AnatomyCLI(LightningCLI):
    """LightningCLI with the project's model and data classes fixed."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001
        # a name the YAML interpolates into checkpoint and TensorBoard folders: ${run_name}
        parser.add_argument("--run_name", type=str, default="run", help="Names this run's output folders.")


def main(args: list[str] | None = None) -> AnatomyCLI:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return AnatomyCLI(
        GRPOModule,
        AnatomyVQADataModule,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
