"""kiln-train: the Hydra entry point, thin.

    overrides -> Hydra composes conf/ onto the schema -> TrainConfig (checked)
    -> plan_run (on the driver, once) -> launch.run(plan) -> summary printed

kiln's own errors (KilnError) end the command with their message and exit code 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kiln.config import paths
from kiln.config.schema import load_config, register_configs
from kiln.errors import ConfigError, KilnError
from kiln.identity import name_or, sweep_name
from kiln.launch.launcher import run
from kiln.plan import RunPlan, plan_run
from kiln.sweep import Sweep, current_trial, trial_dir_name
from kiln.tracking.console import print_line


def config_dir() -> str:
    """kiln's config tree: $KILN_CONFIG_DIR, else the one installed with the package (the
    checkout's conf/ in an editable install); $KILN_CONFIG_PATH's directories are searched
    after it (kiln/config/paths.py)."""
    paths.register_search_path()
    return str(paths.config_dir())


def register_resolvers() -> None:
    """The resolvers conf/train.yaml's hydra section uses (run, sweep and trial directory names)."""
    for name, fn in (("kiln_name", name_or), ("kiln_sweep_name", sweep_name), ("kiln_trial", trial_dir_name)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def print_summary(s: dict, plan: RunPlan) -> None:
    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    print_line("done: " + " | ".join([
        f"{s['steps']} steps",
        f"final train loss {fmt(s['final_loss'])}",
        f"final eval loss {fmt(s['final_eval_loss'])}",
        f"{s['tokens_per_s']:,.0f} tokens/s" if s.get("tokens_per_s") else "tokens/s n/a",
        f"MFU {100 * s['mfu']:.1f}% ({s['mfu_basis']})" if s.get("mfu") is not None
        else f"MFU n/a: {s.get('mfu_basis') or 'no figures'}",
    ]))
    print_line(f"outputs: {s['output_dir']} (metrics.jsonl, summary.json, .hydra/config.yaml)")
    wb = s.get("wandb")
    if not wb:
        print_line("W&B: off (logger=none)")
    elif wb["mode"] == "offline":
        print_line(f"W&B offline run: {wb['dir']}  (upload later: wandb sync {wb['dir']})")
    else:
        print_line(f"W&B {wb['mode']} run: {wb.get('url') or wb['dir']}")
    again = "run the same command to continue" if plan.named else f"continue with trainer.run_name={plan.run_name}"
    print_line(f"checkpoints: {plan.checkpoints} ({again}; kiln-export to share)")


def warn_job_local_paths(cfg, overrides: list[str]) -> None:
    """Under `ray job submit` the working directory is Ray's unpacked copy of --working-dir:
    relative (or default) output and checkpoint paths would vanish with it, and an unnamed run
    submitted again starts over."""
    if not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return
    values = dict(o.split("=", 1) for o in overrides if "=" in o)
    storage = cfg.launcher.storage_path or ""
    loose = [key for key, value in (("hydra.run.dir", values.get("hydra.run.dir", "")),
                                    ("launcher.storage_path", storage))
             if not (os.path.isabs(value) or "://" in value)]
    if loose:
        print_line(f"warning: running as a Ray job with {' and '.join(loose)} relative or unset: outputs land in "
                   f"Ray's copy of the working directory ({os.getcwd()}); set them to absolute paths on "
                   f"shared storage (launchers/ray-job/README.md)")
    if cfg.trainer.run_name is None:
        print_line("warning: running as a Ray job without trainer.run_name: submitting it again starts a new "
                   "run instead of continuing this one; name the run")


def train(cfg: DictConfig) -> dict:
    """One run (not a sweep trial) from Hydra's composed config."""
    typed = load_config(cfg)
    warn_job_local_paths(typed, list(HydraConfig.get().overrides.task))
    plan = plan_run(typed, HydraConfig.get().runtime.output_dir)
    summary = run(plan)
    if not summary.get("skipped"):
        print_summary(summary, plan)
    return summary


register_configs()
register_resolvers()


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    trial = current_trial()
    if trial is not None:  # one trial of a --multirun sweep (its failures are recorded, not raised)
        return Sweep.of_this_process().run_trial(cfg, trial, Path(HydraConfig.get().runtime.output_dir))
    try:
        summary = train(cfg)
    except KilnError as e:
        print(f"kiln-train: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    return summary.get("final_eval_loss")


# trainer.resume once took true/false/a path; say what replaced them instead of Hydra's type error.
_OLD_RESUME = {"true": "trainer.resume=require", "false": "trainer.resume=never"}


def check_old_overrides(argv: list[str]) -> None:
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+") == "trainer.resume" and value not in ("auto", "require", "never"):
            new = _OLD_RESUME.get(value.lower(), f"trainer.resume_from={value}")
            raise ConfigError("trainer.resume", f"trainer.resume={value} is not a resume mode (auto | require | never)",
                              f"use {new}")
        if key.lstrip("+") == "launcher.use_gpu" and value.lower() == "auto":
            raise ConfigError("launcher.use_gpu", "auto is now written null",
                              "use launcher.use_gpu=null (GPUs where the cluster has them), true or false")


def main() -> None:
    try:
        check_old_overrides(sys.argv[1:])
    except ConfigError as e:
        print(f"kiln-train: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
