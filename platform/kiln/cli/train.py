"""kiln-train: the Hydra entry point.

    overrides -> Hydra composes conf/ -> schema check -> validate (before any worker)
    -> plain dict -> launcher (local | ray) -> summary printed on the driver
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kiln.config.schema import register_configs
from kiln.errors import KilnError


def config_dir() -> str:
    """kiln's config tree: $KILN_CONFIG_DIR, else the one installed with the package (the
    checkout's conf/ in an editable install); $KILN_CONFIG_PATH's directories are searched
    after it (kiln/config/paths.py)."""
    from kiln.config import paths

    paths.register_search_path()
    return str(paths.config_dir())


def prepare(cfg: DictConfig) -> dict:
    """Resolve to a plain dict, validate it, and make every path absolute (on the driver)."""
    from kiln.config.validate import validate_config

    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    validate_config(plain)
    plain["output_dir"] = str(Path(HydraConfig.get().runtime.output_dir).resolve())
    return plain


def resolve_data(cfg: dict):
    """Make data paths absolute, build the default corpus if no data is configured, and check
    the data against the config: manifests readable, shards present, enough for every reader."""
    from kiln.config.validate import validate_data
    from kiln.data.default_corpus import ensure_default_dataset
    from kiln.data.plan import plan_data
    from kiln.data.sources import _abs
    from kiln.tracking.console import print_line

    data = cfg["data"]
    if data["path"] is None and not data["mixture"]:
        data["path"] = str(ensure_default_dataset(data["cache_dir"], log=print_line))
    elif data["path"] is not None:
        data["path"] = _abs(data["path"])
    for entry in data["mixture"]:
        entry["path"] = _abs(entry["path"])
    plan = plan_data(cfg, check_open=True)
    validate_data(cfg, plan.sources, plan.tokenizer)
    return plan


def check_resume(cfg: dict, plan) -> Path | None:
    """trainer.resume against storage, and the checkpoint's model shape against the config, on
    the driver: a mismatch fails here, before any worker starts."""
    from kiln.checkpoint.policy import latest_for_check, resolve_resume
    from kiln.checkpoint.state import check_model_shape, read_meta

    explicit = resolve_resume(cfg)
    ckpt = latest_for_check(cfg, explicit)
    m = cfg["model"]
    shape = {k: m[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "bias")}
    shape["vocab_size"] = m["vocab_size"] or plan.tokenizer.vocab_size
    if ckpt is not None:
        check_model_shape(read_meta(ckpt), shape, ckpt)
    if m.get("init_from"):
        check_init_from(m["init_from"], shape)
    return explicit


def check_init_from(source: str, shape: dict) -> None:
    """model.init_from names a kiln checkpoint or export of this model's shape (checked here,
    on the driver, so a wrong path fails before any worker starts)."""
    from kiln.checkpoint.weights import check_export_shape, export_info
    from kiln.checkpoint.state import check_model_shape, read_meta
    from kiln.errors import ConfigError

    path = Path(source).expanduser().resolve()
    if (path / "kiln" / "meta.json").is_file():
        check_model_shape(read_meta(path), shape, path)
    elif path.is_dir() and (path / "model.safetensors").is_file():
        check_export_shape(export_info(path)["shape"], shape, path)
    else:
        raise ConfigError("model.init_from", f"{path} is neither a kiln checkpoint (step_*/kiln/meta.json) "
                          f"nor a kiln-export directory (model.safetensors)",
                          "point it at a step_* checkpoint directory or at kiln-export's output")


def print_summary(s: dict) -> None:
    from kiln.tracking.console import print_line

    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    print_line("done: " + " | ".join([
        f"{s['steps']} steps",
        f"final train loss {fmt(s['final_loss'])}",
        f"final eval loss {fmt(s['final_eval_loss'])}",
        f"{s['tokens_per_s']:,.0f} tokens/s" if s.get("tokens_per_s") else "tokens/s n/a",
    ]))
    print_line(f"outputs: {s['output_dir']} (metrics.jsonl, summary.json, .hydra/config.yaml)")
    wb = s.get("wandb")
    if not wb:
        print_line("W&B: off (logger=none)")
    elif wb["mode"] == "offline":
        print_line(f"W&B offline run: {wb['dir']}  (upload later: wandb sync {wb['dir']})")
    else:
        print_line(f"W&B {wb['mode']} run: {wb.get('url') or wb['dir']}")


def finished_run(cfg: dict, resume_from: Path | None) -> dict | None:
    """The run's summary if its latest checkpoint already reached trainer.max_steps (seen on the
    driver, so nothing is started): running a finished run, or a sweep's finished trial, again."""
    from kiln.checkpoint.policy import latest_for_check
    from kiln.checkpoint.state import read_meta
    from kiln.tracking.console import print_line
    from kiln.tracking.tracker import SUMMARY

    ckpt = latest_for_check(cfg, resume_from)
    max_steps = cfg["trainer"]["max_steps"]
    if ckpt is None or resume_from is not None:
        return None
    step = read_meta(ckpt)["step"]
    if step < max_steps:
        return None
    print_line(f"run {cfg['trainer']['run_name']} already reached step {step} of trainer.max_steps={max_steps}; "
               f"raise trainer.max_steps to train on, or set trainer.run_name for a new run")
    previous = Path(cfg["output_dir"]) / SUMMARY  # a sweep trial re-uses its output directory
    if previous.is_file():
        # (finished: even if that last run was stopped exactly at max_steps)
        return dict(json.loads(previous.read_text()), skipped=True, stopped_early_at=None)
    return {"steps": step, "final_loss": None, "final_eval_loss": None, "tokens_per_s": None,
            "output_dir": cfg["output_dir"], "wandb": None, "skipped": True}


def warn_job_local_paths(cfg: dict, overrides: list[str]) -> None:
    """Under `ray job submit` the working directory is Ray's unpacked copy of --working-dir:
    relative (or default) output and checkpoint paths would vanish with it."""
    from kiln.tracking.console import print_line

    if not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return
    values = dict(o.split("=", 1) for o in overrides if "=" in o)
    storage = cfg["launcher"]["storage_path"] or ""
    loose = [key for key, value in (("hydra.run.dir", values.get("hydra.run.dir", "")),
                                    ("launcher.storage_path", storage))
             if not (os.path.isabs(value) or "://" in value)]
    if loose:
        print_line(f"warning: running as a Ray job with {' and '.join(loose)} relative or unset: outputs land in "
                   f"Ray's copy of the working directory ({os.getcwd()}); set them to absolute paths on "
                   f"shared storage (launchers/ray-job/README.md)")


def run(cfg: DictConfig, trial=None, keep_ray: bool = False) -> dict:
    plain = prepare(cfg)
    warn_job_local_paths(plain, list(HydraConfig.get().overrides.task))
    if trial is not None:
        from kiln.sweep import apply_trial

        apply_trial(plain, trial)
    plan = resolve_data(plain)
    resume_from = check_resume(plain, plan)
    done = finished_run(plain, resume_from)
    if done is not None:
        return done
    # Store the resolved config with the run (Hydra's .hydra/config.yaml keeps the unresolved one).
    out = Path(plain["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(plain), out / "resolved_config.yaml")
    if plain["launcher"]["name"] == "local":
        from kiln.config.validate import validate_devices
        from kiln.launch.env import cuda_available
        from kiln.launch.local import run_local

        validate_devices(plain, 1 if cuda_available() else 0)
        summary = run_local(plain, resume_from)
    else:
        from kiln.launch.ray_launcher import run_ray

        summary = run_ray(plain, resume_from, keep_ray=keep_ray)
    print_summary(summary)
    from kiln.checkpoint.policy import run_dir, storage_root
    from kiln.tracking.console import print_line

    where = f"{storage_root(plain)}/{plain['trainer']['run_name']}" if "://" in storage_root(plain) else run_dir(plain)
    print_line(f"checkpoints: {where} (run the same command to continue; kiln-export to share)")
    return summary


register_configs()


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    from kiln.sweep import current_trial

    trial = current_trial()
    if trial is not None:
        return run_trial(cfg, trial)
    try:
        summary = run(cfg)
    except KilnError as e:
        print(f"kiln-train: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    return summary.get("final_eval_loss")


def run_trial(cfg: DictConfig, trial) -> float:
    """One trial of a --multirun sweep. A failure is recorded and the sweep goes on; a stop
    (SIGTERM) checkpoints this trial and records the rest as not run. Returns the objective
    Hydra's sweepers minimise: the final eval loss (+inf for a trial without one)."""
    import math
    import traceback

    from kiln import sweep
    from kiln.tracking.console import print_line

    out = Path(HydraConfig.get().runtime.output_dir)
    label = trial.trial.replace(",", " ")
    if sweep.stop_requested:
        sweep.record_trial(out, trial, "not run (sweep stopped)")
        return math.inf
    print_line(f"trial {trial.num}: {label}")
    try:
        summary = run(cfg, trial=trial, keep_ray=True)  # Ray stays up for the next trial
    except Exception as e:
        if not isinstance(e, KilnError):
            traceback.print_exc()
        print(f"kiln-train: trial {trial.num} ({label}) failed: {e}", file=sys.stderr, flush=True)
        sweep.record_trial(out, trial, "failed", error=sweep.failure_text(e))
        return math.inf
    if summary.get("stopped_early_at"):
        sweep.stop_requested = True
        status = "interrupted"
        print_line("sweep stopped: the remaining trials are not run; run the same command to continue")
    else:
        status = "skipped (finished before)" if summary.get("skipped") else "done"
    sweep.record_trial(out, trial, status, summary)
    return sweep.objective(summary)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
