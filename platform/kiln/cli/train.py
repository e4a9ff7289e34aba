"""kiln-train: the Hydra entry point, thin.

    overrides -> Hydra composes conf/ onto the schema -> TrainConfig (checked)
    -> plan_run (on the driver, once) -> memory estimate (kiln/estimate.py; a run that cannot fit
       stops here) -> launch.run(plan) -> summary printed     (trainer.dry_run: stop before launch)

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
from kiln.estimate import check_plan, count_params
from kiln.identity import name_or, sweep_name
from kiln.launch.launcher import run
from kiln.plan import RunPlan, plan_run
from kiln.sweep import Sweep, current_trial, trial_dir_name
from kiln.tracking.console import print_line
from kiln.tracking.progress import duration


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
    """The closing lines: what the run reached and how fast, where its time went, where it all is.
    (Keys a summary may lack, from an older kiln or a run that logged nothing, are left out.)"""
    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    final_eval = f"final eval loss {fmt(s['final_eval_loss'])}"
    best = s.get("best_eval_loss")
    if best is not None and best != s.get("final_eval_loss"):
        final_eval += f" (best {best:.4f}" + (f" at step {s['best_eval_step']})" if s.get("best_eval_step") else ")")
    print_line("done: " + " | ".join([
        f"{s['steps']} steps",
        f"final train loss {fmt(s['final_loss'])}",
        final_eval,
        f"{s['tokens_per_s']:,.0f} tokens/s" if s.get("tokens_per_s") else "tokens/s n/a",
        f"MFU {100 * s['mfu']:.1f}% ({s['mfu_basis']})" if s.get("mfu") is not None
        else f"MFU n/a: {s.get('mfu_basis') or 'no figures'}",
    ]))
    totals = [f"{s['tokens']:,} tokens" if s.get("tokens") else None,
              f"{duration(s['wall_s'])} wall" if s.get("wall_s") is not None else None,
              f"goodput {100 * s['goodput']:.1f}%" if s.get("goodput") is not None else None,
              f"{s['restarts']} restart(s)" if s.get("restarts") is not None else None,
              f"{s['lost_steps']} step(s) trained again" if s.get("lost_steps") else None]
    if any(totals):
        print_line("totals: " + " | ".join(t for t in totals if t))
    print_line(f"outputs: {s['output_dir']} (metrics.jsonl, summary.json, logs/rank_<r>.log, .hydra/config.yaml)")
    wb = s.get("wandb")
    if not wb:
        print_line("W&B: off (logger=none)")
    elif wb["mode"] == "offline":
        print_line(f"W&B offline run: {wb['dir']}  (upload later: {wb.get('sync') or 'wandb sync ' + wb['dir']})")
    else:
        print_line(f"W&B {wb['mode']} run: {wb.get('url') or wb['dir']}")
    again = "run the same command to continue" if plan.named else f"continue with trainer.run_name={plan.run_name}"
    print_line(f"checkpoints: {plan.checkpoints} ({again}; kiln-export to share)")


def print_plan(plan: RunPlan) -> None:
    """trainer.dry_run: what the run would do, as the driver resolved it."""
    cfg, m, tr = plan.config, plan.model, plan.config.trainer
    start = (f"continues its step {plan.resume.step}" if plan.resume.own else
             f"starts from {plan.resume.checkpoint}" if plan.resume.checkpoint else "starts fresh")
    print_line(f"plan: run {plan.run_name} ({'named' if plan.named else 'unnamed'}; {start}); outputs "
               f"{plan.output_dir}; checkpoints {plan.checkpoints}")
    sources = ", ".join(f"{s.name} ({len(s.train)} train / {len(s.val)} val shards)" for s in plan.data.sources)
    print_line(f"data: {sources}; vocabulary {m.vocab_size}, eval on {plan.data.val_split} shards")
    print_line(f"model: {cfg.model.name} ({m.arch}, {m.n_layer} layers, {m.n_embd} wide, {m.n_head} heads, "
               f"{count_params(m):,} parameters)")
    tokens = tr.micro_batch_size * tr.grad_accum_steps * cfg.launcher.num_workers * cfg.data.seq_len
    print_line(f"training: {tr.max_steps} steps of {tokens:,} tokens ({tr.micro_batch_size} x {cfg.data.seq_len} "
               f"x {tr.grad_accum_steps} accumulation x {cfg.launcher.num_workers} rank(s)); launcher="
               f"{cfg.launcher.name}, ZeRO-{cfg.parallelism.zero_stage}, {cfg.precision.dtype}")


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
    dry = typed.trainer.dry_run
    if dry:
        print_plan(plan)
    if dry or not plan.finished:
        check_plan(plan, print_line)  # a run that cannot fit in device memory stops here (ConfigError)
    if dry:
        print_line("dry run: nothing started (no Ray, no DeepSpeed, no checkpoints); drop trainer.dry_run to train")
        return {"dry_run": True, "final_eval_loss": None}
    summary = run(plan)
    if not summary.get("skipped"):
        print_summary(summary, plan)
    return summary


register_configs()
register_resolvers()


class HydraProgress:
    """Whether Hydra got as far as kiln's task. Hydra exits 1 when it refuses the command line
    (a misspelt key, a value of the wrong type, broken override grammar): that is bad input,
    exit 2 like every other; an exit 1 after the task started is an unexpected error."""

    task_started = False


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    HydraProgress.task_started = True
    trial = current_trial()
    if trial is not None and cfg.trainer.dry_run:  # (sweep trials are planned and launched by kiln.sweep)
        print("kiln-train: " + str(ConfigError("trainer.dry_run", "a dry run plans one run, not a --multirun sweep",
                                               "drop --multirun to dry-run one trial's settings")),
              file=sys.stderr, flush=True)
        sys.exit(2)
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


# Hydra's own flags that take the next argument as their value (not an override).
_VALUE_FLAGS = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun",
                "--package", "-p", "--cfg", "-c"}
_INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def overrides_in(argv: list[str]) -> list[str]:
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = (arg in _VALUE_FLAGS or arg == "--info" and i + 1 < len(argv) and argv[i + 1] in _INFO_TOPICS)
        else:
            out.append(arg)
    return out


def check_override_grammar(argv: list[str]) -> None:
    """Hydra's parse error ("mismatched input '=' expecting <EOF>") does not say which argument
    it is about: parse each here first and name it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException  # (OverrideParseException is one)

    parser = OverridesParser.create()
    groups = sorted(p.name for p in paths.config_dir().iterdir() if p.is_dir())
    for arg in overrides_in(argv):
        try:
            override = parser.parse_override(arg)
        except HydraException as e:
            key = arg.split("=", 1)[0].lstrip("+~") or arg
            raise ConfigError(key, f"{arg!r} is not an override Hydra can read ({str(e).splitlines()[0]})",
                              "write key=value; quote a value with spaces or special characters (key='a, b'); "
                              "grammar: https://hydra.cc/docs/advanced/override_grammar/basic/") from None
        group, value = override.key_or_group, override.value()
        if group in groups and not isinstance(value, (str, list)) and value is not None and not override.is_sweep_override():
            choices = sorted(p.stem for p in (paths.config_dir() / group).glob("*.yaml"))
            raise ConfigError(group, f"{arg!r} chooses a file of the {group} config group, and {value!r} is not one",
                              f"choose one of: {', '.join(choices)} (or your own, kiln/config/paths.py)")


def main() -> None:
    try:
        check_old_overrides(sys.argv[1:])
        check_override_grammar(sys.argv[1:])
    except ConfigError as e:
        print(f"kiln-train: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    HydraProgress.task_started = False
    try:
        _hydra_main()
    except SystemExit as e:
        if e.code == 1 and not HydraProgress.task_started:
            sys.exit(2)  # Hydra printed why (naming the key); see HydraProgress
        raise


if __name__ == "__main__":
    main()
