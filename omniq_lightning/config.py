"""Config helpers shared by ``train.py``, the benchmarks and the tests (Hydra compose API)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"


def existing_dir(path: str) -> str | None:
    """Resolver ``${existing_dir:PATH}``: PATH (relative to the project root) as an absolute path if it is
    an existing folder, else null. Independent of the working directory, so notebooks and tests agree."""
    p = Path(path).expanduser()
    p = p if p.is_absolute() else PROJECT_ROOT / p
    return str(p.resolve()) if p.is_dir() else None


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("existing_dir"):
        OmegaConf.register_new_resolver("existing_dir", existing_dir)


def compose(overrides: list[str] | None = None, config_dir: str | Path = CONFIG_DIR) -> DictConfig:
    """The run config ``train.py`` would see with these command-line overrides (without starting a run)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides or []))


register_resolvers()
