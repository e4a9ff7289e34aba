"""The Llama-style model end to end: llama-tiny trains (launcher=local, in this process), its
checkpoint exports to a Hugging Face LlamaForCausalLM directory that transformers loads with
kiln's logits, kiln-generate reads both, and model.init_from starts a new run from the export."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import train_in_process
from kiln.tracking.jsonl import read_jsonl

# One xdist worker runs them all: the llama run is a module fixture, trained once, not once per worker.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("llama")]

COMMON = ["launcher=local", "model=llama-tiny", "logger=none", "precision=fp32", "trainer.log_interval=1",
          "trainer.checkpoint_interval=0", "optim.warmup_steps=5", "optim.lr=3e-3", "data.num_workers=0",
          "trainer.eval_interval=1000"]


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, small_dataset):
    from kiln.checkpoint.export import export_checkpoint

    root = tmp_path_factory.mktemp("llama")
    summary = train_in_process([*COMMON, "trainer.max_steps=25", "trainer.run_name=base",
                                f"data.path={small_dataset}"], root / "base")
    (ckpt,) = sorted((root / "base-checkpoints" / "base").glob("step_*"))
    export_checkpoint(ckpt, root / "hf")
    return {"root": root, "ckpt": ckpt, "export": root / "hf", "data": small_dataset, "summary": summary,
            "records": read_jsonl(root / "base" / "metrics.jsonl")}


@pytest.mark.timeout(300)
def test_llama_trains_and_counts_its_flops(llama_run):
    records, summary = llama_run["records"], llama_run["summary"]
    assert [r["step"] for r in records] == list(range(1, 26))
    assert records[-1]["loss"] < records[0]["loss"] - 1.5, (records[0]["loss"], records[-1]["loss"])
    # Untied head: N counts the head but not the input embedding (a lookup); no position table.
    n, vocab = summary["parameters"], 257
    assert summary["flops_per_token"] == 6 * (n - vocab * 64) + 12 * 2 * 64 * 128
    assert summary["memory_basis"] == "host peak RSS" and 0.05 < summary["peak_memory_gib"] < 24


@pytest.mark.timeout(300)
def test_llama_export_loads_in_transformers_with_kiln_logits(llama_run):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from kiln.generate import load_model

    out = llama_run["export"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_key_value_heads"], config["intermediate_size"], config["tie_word_embeddings"]) == (2, 192, False)
    info = json.loads((out / "kiln_export.json").read_text())
    assert info["model_shape"]["arch"] == "llama" and info["step"] == 25
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight"} <= keys

    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert isinstance(hf, LlamaForCausalLM)
    ours, _, src = load_model(llama_run["ckpt"])
    again, _, exp = load_model(out)
    assert (src["source"], exp["source"]) == ("checkpoint", "export")
    x = torch.randint(0, 257, (3, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(x)[0]
        torch.testing.assert_close(hf(x).logits, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(again(x)[0], want)


@pytest.mark.timeout(300)
def test_llama_generates_the_same_text_from_checkpoint_and_export(llama_run):
    from kiln.generate import generate_text, load_model

    texts = []
    for source in (llama_run["ckpt"], llama_run["export"]):
        model, tok, _ = load_model(source)
        texts.append(generate_text(model, tok, "def ", max_new_tokens=32, temperature=1.0, top_k=None, seed=3))
    assert texts[0] == texts[1] and texts[0].startswith("def ") and len(texts[0]) > 4


@pytest.mark.timeout(300)
def test_llama_init_from_export_starts_at_the_trained_loss(llama_run, tmp_path):
    train_in_process([*COMMON, "trainer.max_steps=2", "trainer.run_name=warm", f"data.path={llama_run['data']}",
                      f"model.init_from={llama_run['export']}"], tmp_path / "warm")
    first = read_jsonl(tmp_path / "warm" / "metrics.jsonl")[0]["loss"]
    scratch = llama_run["records"]
    assert first < scratch[0]["loss"] - 1.5 and first < scratch[-1]["loss"] + 0.5, (first, scratch[0]["loss"])


@pytest.mark.timeout(300)
def test_gpt_checkpoint_does_not_resume_as_llama(llama_run, tmp_path):
    from kiln.errors import ConfigError

    with pytest.raises(ConfigError, match="model.arch") as e:
        train_in_process([*COMMON, "model=tiny", "model.bias=true", "trainer.max_steps=2",
                          f"model.init_from={llama_run['export']}", f"data.path={llama_run['data']}"], tmp_path / "r")
    assert "checkpoint llama vs config gpt2" in str(e.value) or "export llama vs config gpt2" in str(e.value)
