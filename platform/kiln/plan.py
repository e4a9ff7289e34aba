"""The run plan: everything about a run that can be decided before a worker starts, decided once
on the driver and then only read.

    TrainConfig (typed, checked) + output dir + sweep trial
        -> plan_run: name the run, make paths absolute, apply the trial, resolve and check the
           data, build the model config, decide the resume source and check its shape
        -> RunPlan (frozen; pickles to Ray workers, which use it and never re-plan)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from kiln.checkpoint.policy import ResumeSource, decide_resume, storage_root
from kiln.checkpoint.meta import check_export_shape, check_model_shape, export_info, read_meta
from kiln.config.redact import redact
from kiln.config.schema import TrainConfig
from kiln.config.validate import validate_data
from kiln.data.default_corpus import ensure_default_dataset
from kiln.data.plan import DataPlan, plan_data
from kiln.data.sources import _abs
from kiln.errors import ConfigError
from kiln.identity import SweepTrial, fresh_run_name
from kiln.model.config import ModelShapeConfig
from kiln.tracking.console import print_line


@dataclass(frozen=True)
class RunPlan:
    config: TrainConfig  # paths absolute, trainer.run_name set, the sweep trial applied
    output_dir: Path  # metrics.jsonl, summary.json, the resolved config
    storage: str  # checkpoint root: an absolute directory, or a URI (launcher=ray)
    named: bool  # the user named the run (so it continues its own checkpoints)
    data: DataPlan
    model: ModelShapeConfig
    resume: ResumeSource
    trial: SweepTrial | None = None
    # The config as kiln writes it (resolved_config.yaml, meta.json, W&B): credentials redacted
    # here, on the driver, whose environment resolved it (kiln.config.redact).
    public_config: dict = field(default_factory=dict)

    @property
    def run_name(self) -> str:
        return self.config.trainer.run_name

    @property
    def checkpoints(self) -> str:
        """Where this run's checkpoints go (<storage>/<run name>)."""
        return f"{self.storage.rstrip('/')}/{self.run_name}"

    @property
    def finished(self) -> bool:
        """The run's own latest checkpoint already reached trainer.max_steps: nothing to train."""
        return self.resume.own and self.resume.step >= self.config.trainer.max_steps


def plan_run(cfg: TrainConfig, output_dir: str | Path, trial: SweepTrial | None = None,
             log=print_line) -> RunPlan:
    """Resolve a checked config into the run's plan (on the driver; reads manifests, may build
    the default corpus). The caller's config is left as it is."""
    cfg = copy.deepcopy(cfg)
    storage = storage_root(cfg.launcher.storage_path)
    named = cfg.trainer.run_name is not None or trial is not None
    if trial is not None:  # the trial's own checkpoint folder and W&B run, grouped by the sweep
        sweep = cfg.trainer.run_name or trial.sweep_name  # (an unnamed sweep: its directory's name)
        storage = f"{storage.rstrip('/')}/{sweep}"
        cfg.trainer.run_name = trial.trial
        cfg.logger.group = cfg.logger.group or sweep
    elif cfg.trainer.run_name is None:
        cfg.trainer.run_name = fresh_run_name()
    cfg.launcher.storage_path = storage

    data = cfg.data
    if data.path is None and not data.mixture:
        data.path = str(ensure_default_dataset(data.cache_dir, log=log))
    elif data.path is not None:
        data.path = _abs(data.path)
    if data.val_path is not None:
        data.val_path = _abs(data.val_path)
    for entry in data.mixture:
        entry.path = _abs(entry.path)
    if cfg.model.init_from is not None:
        cfg.model.init_from = str(Path(cfg.model.init_from).expanduser().resolve())

    data_plan = plan_data(cfg, check_open=True)
    validate_data(cfg, data_plan.sources, data_plan.tokenizer)
    model = cfg.model.build(data_plan.tokenizer.vocab_size)
    resume = decide_resume(cfg.trainer, cfg.trainer.run_name, named, storage)
    if resume.checkpoint is not None:
        check_model_shape(read_meta(resume.checkpoint), model.shape(), resume.checkpoint)
    if cfg.model.init_from is not None:
        check_init_from(Path(cfg.model.init_from), model)
    return RunPlan(config=cfg, output_dir=Path(output_dir).resolve(), storage=storage, named=named,
                   data=data_plan, model=model, resume=resume, trial=trial, public_config=redact(cfg.to_dict()))


def check_init_from(path: Path, model: ModelShapeConfig) -> None:
    """model.init_from names a kiln checkpoint or export of this model's shape."""
    if (path / "kiln" / "meta.json").is_file():
        check_model_shape(read_meta(path), model.shape(), path)
    elif path.is_dir() and (path / "model.safetensors").is_file():
        check_export_shape(export_info(path)["shape"], model.shape(), path)
    else:
        raise ConfigError("model.init_from", f"{path} is neither a kiln checkpoint (step_*/kiln/meta.json) "
                          f"nor a kiln-export directory (model.safetensors)",
                          "point it at a step_* checkpoint directory or at kiln-export's output")
