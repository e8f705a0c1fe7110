"""Entry point: ``python train.py model=stories260k quant=w4a16 method=fp`` (Hydra over configs/)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from omniq_lightning.config import register_resolvers
from omniq_lightning.pipeline import run

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> dict:
    return run(cfg)


if __name__ == "__main__":
    main()
