"""Compose kiln's config in-process, exactly as kiln-train does (same tree, schema and search
path): for tests, benchmarks and notebooks that call `plan_run` / `launch.run` themselves."""

from __future__ import annotations

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from kiln.config import paths
from kiln.config.schema import TrainConfig, load_config, register_configs


def compose(overrides: list[str] | None = None, *, check: bool = True) -> TrainConfig:
    """The TrainConfig for these command-line overrides (check=False: skip the value checks,
    to test them)."""
    register_configs()
    paths.register_search_path()
    with initialize_config_dir(config_dir=str(paths.config_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=list(overrides or []))
    if check:
        return load_config(cfg)
    return OmegaConf.to_object(cfg)
