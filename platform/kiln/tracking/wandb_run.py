"""Weights & Biases from rank 0: which mode, which run fields, and a start that never stops training.

Each setting comes from kiln's config where it sets a value, else from W&B's own environment
variable, else from kiln's default (README, "W&B settings"). A W&B that cannot start online (no
network, a bad key, an unreachable host) gives one warning and the run logs offline instead.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import sys
from pathlib import Path
from urllib.parse import urlparse

from kiln.config.redact import redact
from kiln.errors import KilnError
from kiln.tracking.console import print_line

# WANDB_MODE's values, with W&B's older names for two of them.
ENV_MODES = {"online": "online", "offline": "offline", "disabled": "disabled", "dryrun": "offline", "run": "online"}


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return host in netrc.read_text()  # `wandb login` writes the host's key there
    except OSError:
        return False


def env_mode() -> str | None:
    """W&B's own switches: WANDB_DISABLED=true, else WANDB_MODE; None where neither is set."""
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("true", "1", "yes"):
        return "disabled"
    raw = os.environ.get("WANDB_MODE", "").strip().lower()
    if not raw:
        return None
    if raw not in ENV_MODES:
        raise KilnError(f"WANDB_MODE={raw!r} is not a W&B mode: set it to online, offline or disabled, or unset "
                        f"it (logger.mode=online|offline overrides it)")
    return ENV_MODES[raw]


def resolve_mode(logger_cfg) -> str:
    """logger=none -> disabled; logger.mode online/offline/disabled -> that; auto -> W&B's own
    WANDB_DISABLED/WANDB_MODE where set, else online with credentials, offline without."""
    if logger_cfg.name == "none":
        return "disabled"
    if logger_cfg.mode != "auto":
        return str(logger_cfg.mode)
    return env_mode() or ("online" if has_wandb_credentials() else "offline")


def run_fields(lg, run_name: str) -> dict:
    """wandb.init's naming arguments. W&B's variables are read here, at each run's start: W&B
    itself reads its environment once per process."""
    env = os.environ.get
    tags = list(lg.tags) or [t.strip() for t in env("WANDB_TAGS", "").split(",") if t.strip()]
    return {"project": lg.project or env("WANDB_PROJECT") or "kiln", "entity": lg.entity or env("WANDB_ENTITY"),
            "group": lg.group or env("WANDB_RUN_GROUP"), "tags": tags or None,
            "notes": lg.notes or env("WANDB_NOTES"),
            "name": run_name}  # always kiln's: the name the run's checkpoints (and resume) go by


def wandb_root(output_dir: Path) -> Path:
    """Where wandb/ goes: $WANDB_DIR, else the run's output directory."""
    return Path(os.environ["WANDB_DIR"]).expanduser().resolve() if os.environ.get("WANDB_DIR") else output_dir


def sync_command(run_dir: Path) -> str:
    """The command that uploads an offline run, ready to paste from any directory."""
    return f"wandb sync {shlex.quote(str(Path(run_dir).resolve()))}"


def why(error: Exception) -> str:
    """The first line of W&B's error, short and without credentials."""
    first = (str(error).strip().splitlines() or [""])[0]
    text = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return redact(text if len(text) <= 160 else text[:157] + "...")


@contextlib.contextmanager
def argv_redacted():
    """W&B records the command line (sys.argv, in its run metadata) as wandb.init starts a run:
    it records it with any credential typed into it replaced."""
    saved = sys.argv[:]
    sys.argv[1:] = [redact(a) for a in saved[1:]]
    try:
        yield
    finally:
        sys.argv[:] = saved


def start(cfg, output_dir: Path, resume_id: str | None = None, public_config: dict | None = None
          ) -> WandbRun | None:
    """Rank 0's W&B run in its resolved mode (not disabled). Online that cannot start falls back to
    offline, offline that cannot start to no W&B run (None): each with one warning that says why."""
    import wandb  # here: W&B takes seconds to import, and only rank 0 of a logged run needs it

    lg = cfg.logger
    lg.check()  # logger.init_timeout_s: a bad one would fail in wandb.Settings, before any fallback
    os.environ.setdefault("WANDB_SILENT", "true")  # W&B's banner would break kiln's console
    mode = resolve_mode(lg)
    args = dict(run_fields(lg, cfg.trainer.run_name),
                # A resumed kiln run continues its W&B run: same id, the step axis carrying on.
                resume="allow" if resume_id else None, dir=str(wandb_root(output_dir)),
                config=public_config if public_config is not None else redact(cfg.to_dict()),
                # init_timeout bounds an online start (W&B's default, 90 s, retries an unreachable host).
                settings=wandb.Settings(console="off", x_disable_stats=True, init_timeout=float(lg.init_timeout_s)))
    errors, root = [], wandb_root(output_dir) / "wandb"
    before = set(root.iterdir()) if root.is_dir() else set()
    # A new run's id is chosen here, so a failed start's directory is known by it (even in a
    # shared $WANDB_DIR); the offline retry keeps it, as a resumed run keeps its own.
    run_id = resume_id or secrets.token_hex(4)
    for attempt in ("online", "offline") if mode == "online" else (mode,):
        try:
            with argv_redacted():
                run = wandb.init(mode=attempt, id=run_id, **args)
        except Exception as e:  # whatever W&B raises, training goes on
            errors.append(e)
            end_failed_start(wandb)
            discard(new_run_dirs(root, before, run_id))
            continue
        if errors:
            print_line(f"warning: W&B could not start online ({why(errors[0])}); logging offline instead, to "
                       f"{Path(run.dir).parent} (upload it later with wandb sync; logger.init_timeout_s="
                       f"{lg.init_timeout_s:g} bounds the wait for W&B)")
        return WandbRun(run, attempt)
    print_line(f"warning: W&B could not start ({'; then '.join(why(e) for e in errors)}); this run is recorded "
               f"in metrics.jsonl and summary.json only")
    return None


def end_failed_start(wandb) -> None:
    """W&B's service keeps a failed start's run id busy ("run ID ... is in use"): the retry under
    the same id needs a fresh service. Rank 0 has no other W&B run to lose."""
    try:
        wandb.teardown()
    except Exception:  # the retry then says what is wrong
        pass


def new_run_dirs(root: Path, before: set[Path], run_id: str) -> list[Path]:
    """The W&B run directories of this id under root that were not there before. A failed
    wandb.init leaves one (no history, only its config and W&B's logs of the failure, whose cause
    kiln's warning names), which `wandb sync` of the wandb directory would upload as a run. (Its
    service writes there after wandb.init raised: call after end_failed_start has stopped it.)"""
    return [p for p in (set(root.iterdir()) - before if root.is_dir() else ())
            if p.is_dir() and not p.is_symlink() and p.name.startswith(("run-", "offline-run-"))
            and p.name.rsplit("-", 1)[-1] == run_id]


def discard(dirs: list[Path]) -> None:
    for path in dirs:
        shutil.rmtree(path, ignore_errors=True)


class WandbRun:
    def __init__(self, run, mode: str):
        self.run, self.mode = run, mode
        self.dir = Path(run.dir).parent  # .../wandb/<offline-run-...>
        # The first step W&B's row counter (_step) takes: past a resumed online run's last row.
        self.next_step = run.starting_step
        # Every series plotted against kiln's step, logged in every row: rows a resumed run logs
        # again after its checkpoint, where W&B had already logged past it, land at their step.
        run.define_metric("step")
        run.define_metric("*", step_metric="step")

    def log(self, metrics: dict, step: int) -> None:
        row = dict(metrics, step=step)
        if step >= self.next_step:
            self.run.log(row, step=step)  # _step is kiln's step: every run that has not gone back
        else:
            self.run.log(row)  # W&B drops rows behind its counter; "step" still places this one
        self.next_step = max(step, self.next_step) + 1

    def finish(self, summary: dict) -> dict:
        for k, v in summary.items():
            self.run.summary[k] = v
        info = {"mode": self.mode, "id": self.run.id, "dir": str(self.dir)}
        if self.mode == "online":
            info["url"] = self.run.url
        else:
            info["sync"] = sync_command(self.dir)
        self.run.finish()
        return info
