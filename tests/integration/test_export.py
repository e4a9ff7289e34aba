"""kiln-export, kiln-generate and model.init_from, end to end through the real console scripts:
a tiny fp32 run (launcher=local) trains to a checkpoint; kiln-export writes a Hugging Face GPT-2
directory that transformers loads with the same logits as kiln's GPT; kiln-generate gives the
same text from the checkpoint and from the export; new runs started from either one begin at the
trained loss with a fresh optimizer and schedule. Everything is built here from local files."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from conftest import REPO, assert_ok, kiln_train, stdlib_files
from kiln.tracking.jsonl import read_jsonl

# One xdist worker runs them all: the trained base run is a module fixture, built once, not once per worker.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("export")]

LR = 3e-3
COMMON = ["launcher=local", "model=tiny", "logger=none", "precision=fp32", "trainer.log_interval=1",
          "trainer.checkpoint_interval=0", "optim.warmup_steps=5", f"optim.lr={LR}", "data.num_workers=0"]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def only_checkpoint(storage, run_name: str):
    found = sorted((storage / run_name).glob("step_*"))
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory, small_dataset):
    """A from-scratch run of 30 steps (loss ~5.4 -> ~3) and its checkpoint, exported."""
    root = tmp_path_factory.mktemp("export")
    storage = root / "ckpt"
    proc = kiln_train([*COMMON, "trainer.max_steps=30", "trainer.run_name=base", f"data.path={small_dataset}",
                       f"launcher.storage_path={storage}"], root / "base")
    assert_ok(proc)
    ckpt = only_checkpoint(storage, "base")
    out = root / "hf"
    exp = cli("kiln-export", str(ckpt), str(out))
    assert exp.returncode == 0, exp.stderr
    assert f"-> {out}" in exp.stdout
    return {"root": root, "storage": storage, "ckpt": ckpt, "export": out, "data": small_dataset,
            "records": read_jsonl(root / "base" / "metrics.jsonl")}


def kiln_model_from_checkpoint(ckpt):
    from kiln.checkpoint.meta import read_meta
    from kiln.checkpoint.weights import consolidated_state_dict
    from kiln.model.config import config_from_shape
    from kiln.model.gpt import GPT

    shape = read_meta(ckpt)["model_shape"]
    model = GPT(config_from_shape(shape))
    model.load_state_dict(consolidated_state_dict(ckpt), strict=False)
    return model.eval()


@pytest.mark.timeout(240)
def test_export_loads_in_transformers_with_kiln_logits(base):
    from safetensors import safe_open
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from kiln.data.tokenizer import ByteTokenizer

    out = base["export"]
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "tokenizer.json",
                                               "tokenizer_config.json", "kiln_tokenizer.json", "kiln_export.json"}
    info = json.loads((out / "kiln_export.json").read_text())
    assert info["step"] == 30 and info["checkpoint"] == str(base["ckpt"])
    assert info["model_shape"] == {"arch": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 128,
                                   "vocab_size": 257, "bias": True}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["eos_token_id"] == config["bos_token_id"] == 256
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys and "transformer.wte.weight" in keys  # tied: stored once
        assert tuple(f.get_slice("transformer.h.0.attn.c_attn.weight").get_shape()) == (64, 192)  # Conv1D
        assert tuple(f.get_slice("transformer.h.1.mlp.c_proj.weight").get_shape()) == (256, 64)

    hf = GPT2LMHeadModel.from_pretrained(str(out)).eval()
    ours = kiln_model_from_checkpoint(base["ckpt"])
    x = torch.randint(0, 257, (3, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, _ = ours(x)
        got = hf(x).logits
    assert got.shape == want.shape == (3, 128, 257)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    # The byte tokenizer, as a Hugging Face tokenizer with kiln's ids.
    tok = AutoTokenizer.from_pretrained(str(out))
    text = "def naïve(x):\n    return '✓' + x  # 😀\n"
    assert tok(text)["input_ids"] == ByteTokenizer().encode(text).tolist()
    assert tok.eos_token_id == 256 and tok.decode(ByteTokenizer().encode(text)) == text


@pytest.mark.timeout(120)
def test_export_refuses_what_gpt2_cannot_express(base, tmp_path):
    """model.bias=false: exit 2 naming the key, nothing written."""
    ckpt = tmp_path / "step_000000030"
    shutil.copytree(base["ckpt"] / "kiln", ckpt / "kiln")
    meta = json.loads((ckpt / "kiln" / "meta.json").read_text())
    meta["model_shape"]["bias"] = False
    (ckpt / "kiln" / "meta.json").write_text(json.dumps(meta))
    proc = cli("kiln-export", str(ckpt), str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert "config error at `model.bias`" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(240)
def test_overwrite_replaces_only_an_earlier_export(base, tmp_path):
    from kiln.checkpoint.export import export_checkpoint
    from kiln.errors import DataError

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not an export")
    with pytest.raises(DataError, match="not a kiln export"):
        export_checkpoint(base["ckpt"], mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "not an export"  # untouched
    earlier = tmp_path / "earlier"
    shutil.copytree(base["export"], earlier)
    (earlier / "stale.txt").write_text("from before")
    info = export_checkpoint(base["ckpt"], earlier, overwrite=True)
    assert info["step"] == 30 and not (earlier / "stale.txt").exists()


@pytest.mark.timeout(240)
def test_generate_same_text_from_checkpoint_and_export(base):
    from kiln.generate import generate_text, load_model

    def gen(source, *extra):
        proc = cli("kiln-generate", str(source), "--prompt", "def ", "--max-new-tokens", "48", *extra)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("def ")
        return proc.stdout

    sampling = ["--temperature", "1.0", "--top-k", "0"]
    sampled = gen(base["ckpt"], "--seed", "7", *sampling)
    assert gen(base["export"], "--seed", "7", *sampling) == sampled
    greedy = gen(base["export"], "--temperature", "0", "--seed", "1")

    # The same through the library, in this process: greedy ignores the seed, sampling follows it.
    model, tok, info = load_model(base["ckpt"])
    assert info["source"] == "checkpoint" and info["step"] == 30
    kw = dict(max_new_tokens=48)
    assert generate_text(model, tok, "def ", temperature=0, seed=2, **kw) + "\n" == greedy
    assert generate_text(model, tok, "def ", temperature=1.0, top_k=None, seed=7, **kw) + "\n" == sampled
    assert generate_text(model, tok, "def ", temperature=1.0, top_k=None, seed=8, **kw) + "\n" != sampled


def test_sample_crops_context_and_is_greedy_at_temperature_zero():
    from kiln.generate import sample
    from kiln.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, n_layer=1, n_head=2, n_embd=16, block_size=8)).eval()
    ids = torch.randint(0, 11, (2, 6))
    out = sample(model, ids, max_new_tokens=12, temperature=0, top_k=None, generator=None)
    assert out.shape == (2, 18) and torch.equal(out[:, :6], ids)  # longer than block_size: cropped
    with torch.no_grad():
        logits, _ = model(out[:, -9:-1])
    assert torch.equal(out[:, -1], logits[:, -1].argmax(-1))
    a = sample(model, ids, 12, 1.0, 3, torch.Generator().manual_seed(5))
    b = sample(model, ids, 12, 1.0, 3, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("source", ["export", "ckpt"])
def test_init_from_starts_a_new_run_from_the_weights(base, source):
    """The new run's first loss is the trained model's, far below a from-scratch first loss,
    while its optimizer and LR schedule start over (step 1 at the first warmup value)."""
    name = f"from_{source}"
    storage = base["root"] / f"ckpt_{name}"
    run = base["root"] / name
    proc = kiln_train([*COMMON, "trainer.max_steps=3", f"trainer.run_name={name}", f"data.path={base['data']}",
                       f"launcher.storage_path={storage}", f"model.init_from={base[source]}"], run)
    assert_ok(proc)
    scratch = base["records"]
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["loss"] < scratch[0]["loss"] - 1.5, (records[0]["loss"], scratch[0]["loss"])
    assert records[0]["loss"] < scratch[-1]["loss"] + 0.5
    # A fresh schedule: step 1 takes the first warmup value (warmup 5 capped at max_steps - 1 = 2 here;
    # the 30-step base run's step 1 took LR / 5), not the base run's rate where it ended.
    assert records[0]["lr"] == LR / 2 and records[1]["lr"] == LR and scratch[0]["lr"] == LR / 5
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_step"] is None and summary["steps"] == 3
    assert only_checkpoint(storage, name).name == "step_000000003"


def test_init_from_export_of_another_shape_names_the_key(base):
    """What model.init_from meets (load_init_weights -> read_export) when the config differs."""
    from kiln.checkpoint.weights import read_export
    from kiln.errors import ConfigError

    shape = json.loads((base["export"] / "kiln_export.json").read_text())["model_shape"]
    assert read_export(base["export"], shape)["lm_head.weight"].shape == (257, 64)
    for key, value in (("n_layer", 3), ("block_size", 256), ("vocab_size", 300), ("bias", False)):
        with pytest.raises(ConfigError) as e:
            read_export(base["export"], {**shape, key: value})
        assert e.value.key == f"model.{key}"


@pytest.fixture(scope="module")
def bpe_dataset(tmp_path_factory):
    from kiln.data.build import build_shards
    from kiln.data.tokenizer import train_bpe

    files = stdlib_files(30)
    tok = train_bpe((p.read_text() for p in files), vocab_size=400)
    out = tmp_path_factory.mktemp("bpe") / "d"
    build_shards([str(p) for p in files], out, tok, val_fraction=0.05, shard_tokens=50_000)
    return out


@pytest.mark.timeout(240)
def test_export_of_a_bpe_run_carries_its_tokenizer(tmp_path, bpe_dataset):
    from transformers import AutoTokenizer

    from kiln.data.manifest import load_manifest
    from kiln.data.tokenizer import load_tokenizer

    storage = tmp_path / "ckpt"
    assert_ok(kiln_train([*COMMON, "trainer.max_steps=3", "trainer.run_name=bpe", f"data.path={bpe_dataset}",
                          f"launcher.storage_path={storage}"], tmp_path / "run"))
    out = tmp_path / "hf"
    exp = cli("kiln-export", str(storage / "bpe"), str(out))  # a run directory: its newest checkpoint
    assert exp.returncode == 0, exp.stderr
    assert (out / "tokenizer.json").read_bytes() == (bpe_dataset / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 400
    ours = load_tokenizer(load_manifest(bpe_dataset))
    theirs = AutoTokenizer.from_pretrained(str(out))
    text = "import os\nclass Foo(Bar):\n    def run(self):  pass\n"
    assert theirs(text)["input_ids"] == ours.encode(text).tolist()
    assert theirs.eos_token_id == ours.eos_id == json.loads((out / "config.json").read_text())["eos_token_id"]

    from kiln.generate import generate_text, load_model

    proc = cli("kiln-generate", str(out), "--prompt", "import ", "--max-new-tokens", "20", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    model, tok, _ = load_model(storage / "bpe")  # the checkpoint, with the dataset's tokenizer
    assert tok.name == "bpe"
    assert generate_text(model, tok, "import ", max_new_tokens=20, seed=3) + "\n" == proc.stdout


@pytest.mark.timeout(240)
def test_checkpoint_carries_its_tokenizer_and_never_runs_what_its_meta_names(base, tmp_path):
    """kiln-export reads the tokenizer kept inside the checkpoint, so the dataset may be gone; a
    checkpoint without one (written before kiln kept it) whose config names a pipe: command is
    refused, and the command never runs."""
    from kiln.checkpoint.export import export_checkpoint
    from kiln.errors import DataError

    ckpt = tmp_path / "step_000000030"
    shutil.copytree(base["ckpt"], ckpt)
    assert json.loads((ckpt / "kiln" / "tokenizer" / "kiln_tokenizer.json").read_text())["type"] == "byte"
    meta_file = ckpt / "kiln" / "meta.json"
    meta = json.loads(meta_file.read_text())
    marker = tmp_path / "ran"
    meta["config"]["data"]["path"] = f"pipe:touch {marker}; cat {base['data']}/train-000000.tar"
    meta_file.write_text(json.dumps(meta))
    info = export_checkpoint(ckpt, tmp_path / "out")  # its own tokenizer: the pipe: is never read
    assert info["tokenizer"]["type"] == "byte" and not marker.exists()

    shutil.rmtree(ckpt / "kiln" / "tokenizer")  # an older checkpoint
    with pytest.raises(DataError, match="never runs a command") as e:
        export_checkpoint(ckpt, tmp_path / "out2")
    assert "--tokenizer" in str(e.value) and not marker.exists() and not (tmp_path / "out2").exists()
