"""Weights & Biases, read back from the run files W&B wrote: the mode W&B's own variables choose
(and kiln's explicit config overrides), which names win, the step axis across a resume, the config
and summary, and a W&B host that cannot be reached, which warns once and logs offline."""

from __future__ import annotations

import contextlib
import glob
import shlex
import socket
from pathlib import Path

import pytest

from conftest import train_in_process
from helpers.wandb_log import history, records, run_info
from kiln.config.schema import LoggerConfig, LoggerMode, LoggerName
from kiln.errors import KilnError
from kiln.tracking.jsonl import read_jsonl
from kiln.tracking.wandb_run import WandbRun, resolve_mode, run_fields

pytestmark = pytest.mark.integration

API_KEY = "0123456789abcdef0123456789abcdef01234567"  # fake; W&B keys are 40 hex characters
W_AND_B_VARS = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED", "WANDB_BASE_URL", "WANDB_DIR", "WANDB_PROJECT",
                "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_TAGS", "WANDB_NOTES")


def base(small_dataset: Path) -> list[str]:
    return ["launcher=local", "model=tiny", "logger=wandb", "parallelism=zero0", "precision=fp32",
            "data.num_workers=0", f"data.path={small_dataset}", "trainer.micro_batch_size=4",
            "trainer.log_interval=1", "trainer.eval_interval=2", "trainer.eval_batches=1"]


@pytest.fixture(autouse=True)
def fresh_wandb(monkeypatch):
    """W&B reads its environment once per process: each test starts its own W&B session, from a
    W&B environment of its own (none of the machine's WANDB_* variables)."""
    import wandb

    for var in (*W_AND_B_VARS, "WANDB_SILENT"):
        monkeypatch.setenv(var, "")  # first set, so that monkeypatch also undoes what a run sets
        monkeypatch.delenv(var)
    monkeypatch.setenv("NETRC", "/nonexistent/netrc")  # no `wandb login` credentials either
    wandb.teardown()
    yield
    wandb.teardown()


@contextlib.contextmanager
def listening_host():
    """A W&B host URL on this machine that accepts connections and answers none; yields it and a
    function that says how many connections it had."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        s.setblocking(False)

        def connections() -> int:
            n = 0
            with contextlib.suppress(BlockingIOError):
                while True:
                    s.accept()[0].close()
                    n += 1
            return n

        yield f"http://127.0.0.1:{s.getsockname()[1]}", connections


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on return: connections are refused


def run_file(summary: dict) -> str:
    (path,) = glob.glob(f"{summary['wandb']['dir']}/run-*.wandb")
    return path


def run_record(path: str):
    return next(r.run for r in records(path) if r.WhichOneof("record_type") == "run")


def final_summary(path: str) -> dict:
    out = {}
    for rec in records(path):
        if rec.WhichOneof("record_type") == "summary":
            for item in rec.summary.update:
                out[item.key or "/".join(item.nested_key)] = item.value_json
    return out


def step_axes(path: str) -> set[tuple[str, str]]:
    """(metric name or glob, its step metric) of every define_metric in the run."""
    return {(r.metric.name or r.metric.glob_name, r.metric.step_metric)
            for r in records(path) if r.WhichOneof("record_type") == "metric"}


def check_history(path: str, run_dir: Path, steps: list[int]) -> None:
    """W&B's rows are metrics.jsonl's, at kiln's steps (W&B's _step and the logged step both)."""
    rows, logged = history(path), read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in logged] == steps
    assert [r["_step"] for r in rows] == [r["step"] for r in rows] == steps
    for row, rec in zip(rows, logged):
        assert row["loss"] == pytest.approx(rec["loss"]) and row["lr"] == pytest.approx(rec["lr"])
        assert ("eval_loss" in row) == ("eval_loss" in rec) == (rec["step"] % 2 == 0)


@pytest.mark.timeout(120)
def test_offline_run_follows_wandb_variables_and_resumes_the_same_run(tmp_path, small_dataset, monkeypatch):
    with listening_host() as (host, connections):
        monkeypatch.setenv("WANDB_API_KEY", API_KEY)  # credentials, yet WANDB_MODE decides: offline
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_BASE_URL", host)
        for var, value in (("WANDB_PROJECT", "env-project"), ("WANDB_ENTITY", "env-entity"),
                           ("WANDB_RUN_GROUP", "env-group"), ("WANDB_TAGS", "env-a,env-b"),
                           ("WANDB_DIR", str(tmp_path / "wb"))):
            monkeypatch.setenv(var, value)
        args = [*base(small_dataset), "logger.group=cfg-group", "logger.notes=cfg notes",
                f"launcher.storage_path={tmp_path / 'ck'}", "trainer.run_name=wb"]
        first = train_in_process([*args, "trainer.max_steps=2"], tmp_path / "a")
        second = train_in_process([*args, "trainer.max_steps=4"], tmp_path / "b")  # resumes at step 2
        assert connections() == 0, "an offline run connected to the W&B host"

    assert first["wandb"]["mode"] == second["wandb"]["mode"] == "offline"
    assert first["wandb"]["id"] == second["wandb"]["id"], "the resumed run continues the same W&B run"
    assert second["resumed_from_step"] == 2
    for summary in (first, second):  # $WANDB_DIR, not the run's output directory
        assert Path(summary["wandb"]["dir"]).parent == tmp_path / "wb" / "wandb"
        wb_dir = summary["wandb"]["dir"]
        assert summary["wandb"]["sync"] == f"wandb sync {shlex.quote(wb_dir)}" and Path(wb_dir).is_absolute()
    assert not (tmp_path / "a" / "wandb").exists() and not (tmp_path / "b" / "wandb").exists()

    a, b = run_file(first), run_file(second)
    check_history(a, tmp_path / "a", [1, 2])
    check_history(b, tmp_path / "b", [3, 4])  # the step axis carries on
    for path in (a, b):
        run = run_record(path)
        # kiln's config where it sets a value (group, notes), else W&B's variable (project,
        # entity, tags), else kiln's own (the name: trainer.run_name)
        assert (run.project, run.entity, run.run_group, run.notes) == ("env-project", "env-entity", "cfg-group",
                                                                       "cfg notes")
        assert list(run.tags) == ["env-a", "env-b"] and run.display_name == "wb"
        assert step_axes(path) == {("step", ""), ("*", "step")}, "every series on kiln's step axis"
    cfg = run_info(b)["config"]
    assert cfg["trainer"]["max_steps"] == 4 and cfg["logger"]["notes"] == "cfg notes"
    assert cfg["data"]["path"] == str(small_dataset)
    summary = final_summary(b)
    assert summary["steps"] == "4" and float(summary["final_loss"]) == pytest.approx(second["final_loss"])
    assert float(summary["final_eval_loss"]) == pytest.approx(second["final_eval_loss"])
    for p in tmp_path.rglob("*"):
        assert not p.is_file() or API_KEY.encode() not in p.read_bytes(), f"the API key was written to {p}"


@pytest.mark.timeout(120)
def test_unreachable_wandb_host_warns_once_and_the_run_logs_offline(tmp_path, small_dataset, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_API_KEY", API_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("WANDB_MODE", "offline")  # the explicit logger.mode=online wins over it
    summary = train_in_process([*base(small_dataset), "logger.mode=online", "logger.init_timeout_s=5",
                                "trainer.max_steps=4"], tmp_path / "run")
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "W&B" in line and "warning" in line]
    assert len(warnings) == 1, out
    assert "could not start online" in warnings[0] and "connection refused" in warnings[0]  # the cause
    assert "logging offline instead" in warnings[0] and "logger.init_timeout_s=5" in warnings[0]
    assert API_KEY not in out
    assert summary["steps"] == 4 and summary["wandb"]["mode"] == "offline"
    assert str(Path(summary["wandb"]["dir"])) in warnings[0]
    path = run_file(summary)
    assert Path(path).parent.name.startswith("offline-run-")
    # The failed online start left no run directory of its own for `wandb sync` to upload.
    runs = [p.name for p in Path(path).parent.parent.iterdir() if p.is_dir() and not p.is_symlink()]
    assert runs == [Path(path).parent.name], runs
    check_history(path, tmp_path / "run", [1, 2, 3, 4])
    assert final_summary(path)["steps"] == "4"


@pytest.mark.timeout(180)
def test_a_resumed_run_that_cannot_reach_wandb_continues_its_run_offline(tmp_path, small_dataset, monkeypatch, capsys):
    """The offline retry keeps the resumed run's W&B id (W&B's service holds a failed start's id
    busy: kiln starts a fresh one), so the upload later continues the same W&B run."""
    common = [*base(small_dataset), "trainer.run_name=again", f"launcher.storage_path={tmp_path / 'ck'}"]
    first = train_in_process([*common, "logger.mode=offline", "trainer.max_steps=4"], tmp_path / "a")
    monkeypatch.setenv("WANDB_API_KEY", API_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    capsys.readouterr()
    second = train_in_process([*common, "logger.mode=online", "logger.init_timeout_s=5", "trainer.max_steps=6"],
                              tmp_path / "b")
    out = capsys.readouterr().out
    assert "resumed from" in out and "logging offline instead" in out, out
    assert second["wandb"]["mode"] == "offline" and second["wandb"]["id"] == first["wandb"]["id"]
    path = run_file(second)
    assert run_info(path)["id"] == first["wandb"]["id"]
    assert [r["_step"] for r in history(path)] == [5, 6]
    runs = [p.name for p in Path(path).parent.parent.iterdir() if p.is_dir() and not p.is_symlink()]
    assert runs == [Path(path).parent.name], runs


@pytest.mark.timeout(120)
def test_wandb_mode_disabled_gives_no_wandb_run(tmp_path, small_dataset, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    summary = train_in_process([*base(small_dataset), "trainer.max_steps=2"], tmp_path / "run")
    assert summary["wandb"] is None and not (tmp_path / "run" / "wandb").exists()
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


def logger(mode: str = "auto", name: str = "wandb", **fields) -> LoggerConfig:
    return LoggerConfig(name=LoggerName(name), mode=LoggerMode(mode), **fields)


@pytest.mark.parametrize("env, cfg, expected", [
    ({"WANDB_API_KEY": API_KEY, "WANDB_MODE": "offline"}, logger(), "offline"),  # the reported bug
    ({"WANDB_API_KEY": API_KEY}, logger(), "online"),
    ({}, logger(), "offline"),
    ({"WANDB_MODE": "online"}, logger(), "online"),
    ({"WANDB_MODE": "dryrun"}, logger(), "offline"),  # W&B's old name
    ({"WANDB_API_KEY": API_KEY, "WANDB_DISABLED": "true"}, logger(), "disabled"),
    ({"WANDB_MODE": "disabled"}, logger("offline"), "offline"),  # an explicit logger.mode wins
    ({"WANDB_MODE": "offline"}, logger("online"), "online"),
    ({"WANDB_MODE": "online"}, logger(name="none", mode="disabled"), "disabled"),
])
def test_mode_precedence(monkeypatch, env, cfg, expected):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert resolve_mode(cfg) == expected


def test_unknown_wandb_mode_names_the_variable(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offlien")
    with pytest.raises(KilnError, match="WANDB_MODE='offlien'.*online, offline or disabled"):
        resolve_mode(logger())


def test_run_fields_config_beats_variable_beats_default(monkeypatch):
    assert run_fields(logger(), "r") == {"project": "kiln", "entity": None, "group": None, "tags": None,
                                         "notes": None, "name": "r"}
    for var, value in (("WANDB_PROJECT", "p"), ("WANDB_ENTITY", "e"), ("WANDB_RUN_GROUP", "g"),
                       ("WANDB_TAGS", "x, y"), ("WANDB_NOTES", "n"), ("WANDB_NAME", "ignored")):
        monkeypatch.setenv(var, value)
    assert run_fields(logger(), "r") == {"project": "p", "entity": "e", "group": "g", "tags": ["x", "y"],
                                         "notes": "n", "name": "r"}
    mine = logger(project="P", entity="E", group="G", tags=["T"], notes="N")
    assert run_fields(mine, "r") == {"project": "P", "entity": "E", "group": "G", "tags": ["T"], "notes": "N",
                                     "name": "r"}


class FakeRun:
    """A W&B run that records what WandbRun.log hands it."""

    dir = "/x/wandb/offline-run-1/files"

    def __init__(self, starting_step: int):
        self.starting_step, self.rows, self.axes = starting_step, [], []

    def define_metric(self, name, step_metric=None):
        self.axes.append((name, step_metric))

    def log(self, row, step=None):
        self.rows.append((row["step"], step))


def test_rows_behind_wandbs_step_counter_are_placed_by_the_step_metric():
    fresh, resumed = FakeRun(0), FakeRun(5)  # resumed: from step 2, where W&B had rows to _step 4
    for run in (fresh, resumed):
        wb = WandbRun(run, "offline")
        for step in (3, 4, 5, 6):
            wb.log({"loss": 1.0}, step)
        assert run.axes == [("step", None), ("*", "step")]
    assert fresh.rows == [(3, 3), (4, 4), (5, 5), (6, 6)]  # W&B's _step is kiln's step
    # W&B would drop rows at steps behind its counter: these take its next steps (5, 6, ...), and
    # so does every later row; the logged "step" places each on kiln's axis.
    assert resumed.rows == [(3, None), (4, None), (5, None), (6, None)]
