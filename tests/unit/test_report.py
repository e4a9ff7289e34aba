"""kiln-report: run, resumed-run, sweep and overlay directories as kiln writes them -> PNG curves
read back from disk, and the numbers of the text summary; unreadable input -> exit 2, naming the file."""

import json
import math
import subprocess

import matplotlib.image
import pytest

from kiln.cli.report import main
from kiln.report.series import distinct_labels, last_per_step, load_sweep

TOKENS_PER_STEP = 4096
CPU_BASIS = "no peak for a CPU (trainer.peak_tflops sets one)"


def record(step, loss=None, eval_loss=None, lr_peak=1e-3, **extra) -> dict:
    """One metrics.jsonl record as training/metrics.py writes it (10 warm-up steps)."""
    loss = 2.2 + 3.3 * math.exp(-step / 30) if loss is None else loss
    r = {"step": step, "loss": loss, "lr": lr_peak * min(1.0, step / 10), "grad_norm": 1 + 9 * math.exp(-step / 10),
         "tokens": step * TOKENS_PER_STEP, "tokens_per_s": 6000.0 + step, **extra}
    if eval_loss is not None:
        r["eval_loss"] = eval_loss
    return r


def write_run(run_dir, records, summary=None, overrides=None, trial=None):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if overrides is not None:
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if trial is not None:
        (run_dir / "trial.json").write_text(json.dumps(trial, indent=2))
    return run_dir


def summary(run_name, records, **extra) -> dict:
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    return {"run_name": run_name, "steps": records[-1]["step"], "final_loss": records[-1]["loss"],
            "final_eval_loss": evals[-1] if evals else None, "tokens_per_s": 6010.0, "mfu": None,
            "mfu_basis": CPU_BASIS, **extra}


def assert_png(path, width=1080, height=600):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    img = matplotlib.image.imread(path)
    assert img.shape[:2] == (height, width), (path, img.shape)
    dark = (img[..., :3].mean(axis=-1) < 0.5).mean()  # text, axes and curves on white
    assert 0.002 < dark < 0.5, (path, dark)


def resumed_run(run_dir):
    """Logged 10..60 (eval every 20), killed; resumed from its step-40 checkpoint, logged 50..100.
    The abandoned step 60 had the lowest eval loss of all: a report that kept it would call it best."""
    first_evals = {20: 2.40, 40: 2.30, 60: 1.90}
    first = [record(s, eval_loss=first_evals.get(s)) for s in range(10, 70, 10)]
    evals = {60: 2.30, 80: 2.10, 100: 2.15}
    second = [record(s, loss=3.0 - s / 100, eval_loss=evals.get(s)) for s in range(50, 110, 10)]
    write_run(run_dir, first + second, summary("mine", second))
    return first, second


@pytest.mark.timeout(60)
def test_last_per_step_keeps_the_restarts_record_and_drops_the_abandoned_ones():
    first = [{"step": s, "run": 1} for s in (2, 4, 6, 7)]  # logged every step from 6 on
    second = [{"step": s, "run": 2} for s in (6, 8, 10)]  # resumed from step 4's checkpoint
    kept = last_per_step(first + second)
    assert [(r["step"], r["run"]) for r in kept] == [(2, 1), (4, 1), (6, 2), (8, 2), (10, 2)]
    assert last_per_step(first) == first


@pytest.mark.timeout(60)
def test_report_of_a_resumed_run(tmp_path, capsys):
    run_dir = tmp_path / "outputs" / "mine" / "2026-12-01_13-51-06"
    first, second = resumed_run(run_dir)

    assert main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "steps       100 (10 records; 2 record(s) replaced by a resumed run's)" in out
    assert "train loss  final 2.0000 at step 100" in out
    assert "eval loss   final 2.1500 at step 100; best 2.1000 at step 80" in out
    kept = first[:4] + second
    assert f"tokens/s    mean {sum(r['tokens_per_s'] for r in kept) / len(kept):,.0f} over 10 intervals" in out
    assert "steady 6,010 (summary.json)" in out
    assert f"MFU         n/a: {CPU_BASIS}" in out
    report = run_dir / "report"
    assert sorted(p.name for p in report.iterdir()) == ["grad_norm.png", "loss.png", "lr.png", "throughput.png"]
    for png in report.iterdir():
        assert_png(png)
        assert str(png) in out


@pytest.mark.timeout(60)
def test_events_are_listed_and_marked_on_the_loss_curve(tmp_path, capsys):
    """A loss spike rolled back (as training/fit.py records it, through kiln's own writer), one
    with nothing to roll back to, and a last line a kill cut short: two events reported."""
    from kiln.tracking.events import record_event

    records = [record(s) for s in range(5, 65, 5)]
    plain = write_run(tmp_path / "plain", records, summary("plain", records))
    spiky = write_run(tmp_path / "spiky", records, summary("spiky", records))
    spike = {"loss": 41.5, "recent_mean": 3.1, "limit": 3.6}
    record_event(spiky, "loss_spike", 8, rolled_back_to=None, **spike)
    record_event(spiky, "loss_spike", 26, rolled_back_to=20, skipped_micro_batches=6, rollback=1, **spike)
    with open(spiky / "events.jsonl", "a") as f:
        f.write('{"event": "loss_sp')
    assert main([str(spiky)]) == 0
    out = capsys.readouterr().out
    assert "  events      step 8: loss spike (loss 41.5 > limit 3.6); no checkpoint to roll back to" in out
    assert "              step 26: loss spike (loss 41.5 > limit 3.6); rolled back to step 20, skipped 6 micro-batch(es)" in out
    assert main([str(plain)]) == 0 and "  events  " not in capsys.readouterr().out
    marked, unmarked = (matplotlib.image.imread(d / "report" / "loss.png") for d in (spiky, plain))
    assert_png(spiky / "report" / "loss.png")
    assert (marked != unmarked).any(axis=-1).mean() > 0.002, "the event lines (and their legend entry) are drawn"


@pytest.mark.timeout(60)
def test_mfu_and_keys_added_later_are_drawn_and_text_is_ignored(tmp_path, capsys):
    records = [record(s, mfu=0.25 + s / 1000, **{"time/step_s": 0.5, "memory/gib": 3.0, "note": "warm"})
               for s in range(10, 110, 10)]
    run_dir = write_run(tmp_path / "gpu-run", records, summary("gpu", records, mfu=0.3))
    out_dir = tmp_path / "pictures"
    assert main([str(run_dir), "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "MFU         mean 30.5% over 10 intervals; steady 30.0% (summary.json)" in out
    assert "eval loss   none logged" in out
    assert {"mfu.png", "other.png", "loss.png"} <= {p.name for p in out_dir.iterdir()}
    assert_png(out_dir / "mfu.png")
    assert matplotlib.image.imread(out_dir / "other.png").shape[1] == round(4.2 * 2 * 120)  # 2 keys side by side
    assert not (run_dir / "report").exists()


def sweep_dir(tmp_path, numbered: bool):
    """Two finished trials and one that failed before logging: as kiln names trial dirs (by their
    overrides, trial.json in each, trials.json beside them) or as Hydra's default numbers them."""
    sweep = tmp_path / "multirun" / "lr-sweep"
    rows = []
    for num, (lr, final) in enumerate([("0.001", 2.2), ("0.003", 2.05)]):
        overrides = [f"optim.lr={lr}", "trainer.max_steps=100"]
        records = [record(s, lr_peak=float(lr), eval_loss=final + (100 - s) / 200 if s % 50 == 0 else None)
                   for s in range(10, 110, 10)]
        name = str(num) if numbered else f"optim.lr={lr}"
        trial = None if numbered else {"num": num, "trial": name, "overrides": overrides, "status": "done",
                                       "final_eval_loss": final, "output_dir": str(sweep / name)}
        write_run(sweep / name, records, summary(name, records), overrides, trial)
        rows.append(trial)
    if not numbered:
        failed = {"num": 2, "trial": "optim.lr=1000000.0", "status": "failed",
                  "overrides": ["optim.lr=1000000.0", "trainer.max_steps=100"], "final_eval_loss": None, "error": "training diverged",
                  "output_dir": str(sweep / "optim.lr=1000000.0")}
        (sweep / "trials.json").write_text(json.dumps(rows + [failed]))  # its directory was never made
    return sweep


@pytest.mark.timeout(60)
def test_report_of_a_sweep(tmp_path, capsys):
    sweep = sweep_dir(tmp_path, numbered=False)
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert f"sweep {sweep}: 3 trial(s); all with trainer.max_steps=100" in out
    lines = out.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("trial  overrides")))
    assert [line.split() for line in lines[header + 1:header + 4]] == [
        ["0", "optim.lr=0.001", "2.2000", "2.2000", "@", "100", "done"],
        ["1", "optim.lr=0.003", "2.0500", "2.0500", "@", "100", "done"],
        ["2", "optim.lr=1000000.0", "-", "-", "failed"]]
    assert "best: trial 1 (optim.lr=0.003): final eval loss 2.0500" in out
    pngs = sorted((sweep / "report").iterdir())
    assert [p.name for p in pngs] == ["grad_norm.png", "loss.png", "lr.png", "throughput.png"]
    for png in pngs:
        assert_png(png)


@pytest.mark.timeout(60)
def test_sweep_of_hydra_numbered_dirs_without_kiln_records(tmp_path):
    sweep = sweep_dir(tmp_path, numbered=True)
    (sweep / "10").mkdir()  # the eleventh trial: started, logged nothing yet
    (sweep / "10" / "metrics.jsonl").write_text("")
    trials = load_sweep(sweep)
    assert [(t.num, t.overrides[0], t.final_eval_loss, t.status) for t in trials] == [
        (0, "optim.lr=0.001", 2.2, "done"), (1, "optim.lr=0.003", 2.05, "done"),
        (10, "10", None, "no summary.json (running, or killed)")]
    assert trials[0].run.records[-1]["step"] == 100 and trials[2].run.records == []


@pytest.mark.timeout(60)
def test_sweep_legend_names_what_differs(tmp_path):
    trials = load_sweep(sweep_dir(tmp_path, numbered=False))
    assert [t.num for t in trials] == [0, 1, 2] and trials[2].run is None
    labels, common = distinct_labels([t.overrides for t in trials])
    assert labels == ["optim.lr=0.001", "optim.lr=0.003", "optim.lr=1000000.0"]
    assert common == ["trainer.max_steps=100"]
    assert distinct_labels([["a=1", "b=2"]]) == (["a=1 b=2"], [])


@pytest.mark.timeout(60)
def test_several_runs_overlaid(tmp_path, capsys):
    dirs = []
    for name, lr in (("small-lr", 3e-4), ("big-lr", 3e-3)):
        records = [record(s, lr_peak=lr, eval_loss=2.4 if s == 100 else None) for s in range(10, 110, 10)]
        dirs.append(str(write_run(tmp_path / name / "2026-12-01_10-00-00", records, summary(name, records))))
    assert main(dirs) == 2
    assert "add --out DIR" in capsys.readouterr().err
    assert main([*dirs, "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert f"run small-lr: {dirs[0]}" in out and f"run big-lr: {dirs[1]}" in out
    assert_png(tmp_path / "cmp" / "lr.png")


def bad_dirs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    blank = write_run(tmp_path / "blank", [])
    broken = write_run(tmp_path / "broken", [record(10), record(20)])
    with open(broken / "metrics.jsonl", "a") as f:
        f.write('{"step": 30, "loss": 2.5, "lr"\n')  # killed mid-write
    no_step = write_run(tmp_path / "no-step", [record(10)])
    with open(no_step / "metrics.jsonl", "a") as f:
        f.write('[1, 2]\n')
    return {"no metrics": (empty, f"{empty}/metrics.jsonl: not found"),
            "empty": (blank, f"{blank}/metrics.jsonl: empty"),
            "malformed": (broken, f"{broken}/metrics.jsonl:3: not valid JSON"),
            "not a record": (no_step, f"{no_step}/metrics.jsonl:2: not a metrics record"),
            "missing": (tmp_path / "nowhere", f"{tmp_path}/nowhere: no such directory")}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["no metrics", "empty", "malformed", "not a record", "missing"])
def test_unreadable_input_names_the_file(tmp_path, capsys, case):
    path, message = bad_dirs(tmp_path)[case]
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kiln-report: {message}") and "fix:" in err
    assert not (path / "report").exists()


@pytest.mark.timeout(60)
def test_entry_point_exits_2_without_a_traceback(tmp_path):
    path, message = bad_dirs(tmp_path)["malformed"]
    proc = subprocess.run(["kiln-report", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""
