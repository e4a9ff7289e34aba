"""Fuzzing the inputs a user or a download hands kiln: random override strings, and random bytes
as shards, manifests and checkpoint files. Every case must end with kiln's own clear error (exit
code 2, naming the key or file) or, for an input that happens to be valid, a clean dry run: never
a traceback from inside a library. The cases are drawn from a seeded generator, so a failure
reproduces (its case is in the assertion message)."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys

import pytest

from conftest import main_in_process, train_in_process

pytestmark = pytest.mark.integration

SEED = 20261201
TRACEBACK_SIGNS = ("Traceback (most recent call last)", "Error executing job")

# Keys across every section, and values chosen to break things: wrong types, out of range,
# grammar Hydra must reject, paths that do not exist, injections.
KEYS = ["trainer.max_steps", "trainer.micro_batch_size", "trainer.grad_accum_steps", "trainer.log_interval",
        "trainer.keep_checkpoints", "trainer.resume", "trainer.resume_from", "trainer.run_name", "trainer.seed",
        "trainer.spike_threshold", "trainer.activation_checkpointing", "trainer.on_nonfinite",
        "optim.lr", "optim.beta1", "optim.beta2", "optim.weight_decay", "optim.warmup_steps", "optim.grad_clip",
        "data.path", "data.manifest", "data.val_path", "data.shuffle_buffer", "data.seq_len", "data.num_workers",
        "data.open_shards", "data.read_timeout_s", "data.on_error", "model.n_layer", "model.n_head", "model.n_embd",
        "model.block_size", "model.vocab_size", "model.arch", "model.init_from", "model.dropout",
        "parallelism.zero_stage", "precision.dtype", "launcher.num_workers", "launcher.timeout_s",
        "launcher.storage_path", "logger.mode", "model", "parallelism", "precision", "experiment", "nosuch.key"]
VALUES = ["-1", "0", "1e309", "nan", "-inf", "abc", "''", "[", "]", "{a:1}", "[1,2]", "null", "true", "3.5",
          "99999999999999999999", "/nonexistent/dir", "../../etc/passwd", "'pipe:false'", "'https://x.invalid/a'",
          "ümlaut", "'a b'", "x" * 300, "${oc.env:NO_SUCH_VAR_KILN}", "${nosuch:1}", "'%s%n'", "\\\\", "1,2"]
# (data.path=null would build the default corpus: a valid input, just slow)
NOT_NULL = {"data.path"}


def random_overrides(rng: random.Random) -> list[str]:
    out = []
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(KEYS)
        value = rng.choice([v for v in VALUES if not (key in NOT_NULL and v == "null")])
        out.append(f"{key}={value}")
    if rng.random() < 0.2:
        out.append(rng.choice(["=", "==x", "+", "~", "a=b=c", "trainer.max_steps", "++trainer=1"]))
    return out


def kiln_train_in_process(argv: list[str], capsys) -> tuple[int, str]:
    code, out, err = main_in_process(argv, capsys)
    return code, out + err


def assert_clean(code: int, text: str, case) -> None:
    assert code in (0, 2), f"{case}: exit {code}\n{text[-3000:]}"
    assert not any(s in text for s in TRACEBACK_SIGNS), f"{case}: a traceback\n{text[-3000:]}"
    if code == 2:  # kiln's message, or Hydra's naming the key or the config group
        assert any(s in text for s in ("kiln-train:", "full_key:", "Could not ", "Ambiguous value for argument")), \
            f"{case}: {text}"


@pytest.mark.timeout(600)
def test_random_overrides_end_in_a_clear_error_or_a_clean_dry_run(tmp_path, small_dataset, capsys):
    rng = random.Random(SEED)
    base = ["launcher=local", "logger=none", "trainer.dry_run=true", f"data.path={small_dataset}",
            f"launcher.storage_path={tmp_path / 'ck'}"]
    codes = []
    for i in range(40):
        case = random_overrides(rng)
        code, text = kiln_train_in_process([*base, *case, f"hydra.run.dir={tmp_path / f'run{i}'}"], capsys)
        assert_clean(code, text, case)
        codes.append(code)
    assert codes.count(2) >= 30, codes  # nearly all of these inputs are bad: each was refused


def random_bytes(rng: random.Random, n: int) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(n))


@pytest.mark.timeout(600)
def test_random_bytes_as_a_manifest_or_shards_are_named(tmp_path, small_dataset, capsys):
    rng = random.Random(SEED + 1)
    manifest = json.loads((small_dataset / "manifest.json").read_text())
    junk_manifests = [random_bytes(rng, 200), b"", b"{", b"[]", b'{"splits": 5}', b'{"splits": {"train": [{}]}}',
                      json.dumps({**manifest, "format": "other"}).encode(),
                      json.dumps({**manifest, "tokenizer": {"type": "bpe", "file": "../../../etc/passwd"}}).encode()]
    for i, junk in enumerate(junk_manifests):
        d = tmp_path / f"m{i}"
        shutil.copytree(small_dataset, d)
        (d / "manifest.json").write_bytes(junk)
        code, text = kiln_train_in_process(["launcher=local", "logger=none", "trainer.dry_run=true", f"data.path={d}",
                                            f"hydra.run.dir={tmp_path / f'run-m{i}'}"], capsys)
        assert_clean(code, text, f"manifest {junk[:60]!r}")
        assert code == 2 and "manifest" in text, f"manifest {junk[:60]!r}: {text}"

    # shards of random bytes, each the size its manifest lists (so only reading them can tell)
    d = tmp_path / "noise"
    shutil.copytree(small_dataset, d)
    for shard in d.glob("train-*.tar"):
        shard.write_bytes(random_bytes(rng, shard.stat().st_size))
    code, text = kiln_train_in_process(["launcher=local", "logger=none", "model=tiny", "trainer.max_steps=2",
                                        "data.num_workers=0", f"data.path={d}", f"launcher.storage_path={tmp_path}/ck",
                                        f"hydra.run.dir={tmp_path / 'run-noise'}"], capsys)
    assert_clean(code, text, "random shards")
    assert code == 2 and "shard " in text and str(d) in text, text


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, small_dataset):
    root = tmp_path_factory.mktemp("fuzz-ckpt")
    train_in_process(["launcher=local", "model=tiny", "logger=none", "parallelism=zero0", "precision=fp32",
                      "data.num_workers=0", "trainer.max_steps=2", "trainer.run_name=fz", f"data.path={small_dataset}"],
                     root / "run")
    (ckpt,) = sorted((root / "run-checkpoints" / "fz").glob("step_*"))
    return ckpt


@pytest.mark.timeout(600)
@pytest.mark.parametrize("target", ["kiln/meta.json", "ds/step2/mp_rank_00_model_states.pt", "kiln/tokenizer"])
def test_random_bytes_in_a_checkpoint_are_named_by_export_and_generate(checkpoint, tmp_path, target, capsys):
    from kiln.cli import export, generate

    rng = random.Random(SEED + 2)
    ckpt = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, ckpt)
    victim = ckpt / target
    if victim.is_dir():  # every file in it
        for f in victim.iterdir():
            f.write_bytes(random_bytes(rng, max(64, f.stat().st_size)))
        victim = next(victim.iterdir())
    else:
        victim.write_bytes(random_bytes(rng, max(64, victim.stat().st_size)))
    for tool, argv in ((export, [str(ckpt), str(tmp_path / "out")]),
                       (generate, [str(ckpt), "--prompt", "def ", "--max-new-tokens", "2"])):
        code = tool.main(argv)
        out = capsys.readouterr()
        text = out.out + out.err
        assert code == 2, f"{tool.__name__} on random {target}: exit {code}\n{text[-3000:]}"
        assert not any(s in text for s in TRACEBACK_SIGNS)
        named = str(victim.parent if target == "kiln/tokenizer" else victim)
        assert named in text or str(ckpt / target) in text, f"{tool.__name__} on random {target}: {text}"


@pytest.mark.timeout(300)
def test_random_bytes_as_a_resumed_runs_state_are_named(checkpoint, tmp_path, small_dataset):
    from kiln.errors import KilnError

    rng = random.Random(SEED + 3)
    run = tmp_path / "run-checkpoints" / "fz"
    shutil.copytree(checkpoint, run / checkpoint.name)
    victim = run / checkpoint.name / "kiln" / "rank_0.pt"
    victim.write_bytes(random_bytes(rng, os.path.getsize(victim)))
    with pytest.raises(KilnError) as e:
        train_in_process(["launcher=local", "model=tiny", "logger=none", "parallelism=zero0", "precision=fp32",
                          "data.num_workers=0", "trainer.max_steps=4", "trainer.run_name=fz",
                          f"data.path={small_dataset}"], tmp_path / "run")
    assert str(victim) in str(e.value)
    assert victim.is_file() and len(list(run.iterdir())) == 1  # kept, and no fresh start beside it
