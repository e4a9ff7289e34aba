"""Every config group and experiment composes onto the schema and validates; bad values fail
with the key's name. kiln-train is run for real for the errors users hit first."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import REPO, kiln_train, main_in_process, with_storage
from kiln.config.validate import use_gpus, validate_data
from kiln.errors import ConfigError

GROUPS = ["model", "data", "parallelism", "precision", "optim", "trainer", "launcher", "logger", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), f"conf/{group}/ is empty"
    assert set(options("model")) == {"tiny", "gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl", "llama-tiny", "llama-1b"}
    assert set(options("parallelism")) == {"zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"}
    assert set(options("precision")) == {"bf16", "fp16", "fp32"}
    assert set(options("launcher")) == {"local", "ray"}
    assert set(options("logger")) == {"wandb", "none"}


@pytest.mark.parametrize("override", [f"{g}={o}" for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(override, compose):
    cfg = compose([override])
    cfg.check()
    group, option = override.split("=")
    if group not in ("experiment", "data", "optim", "trainer"):
        assert getattr(cfg, group).name == option


def test_defaults_are_the_embedded_demo(compose):
    cfg = compose([])
    assert cfg.launcher.name == "ray" and cfg.launcher.num_workers == 2
    assert cfg.launcher.address is None
    assert cfg.parallelism.zero_stage == 2
    assert cfg.model.name == "tiny"
    assert cfg.logger.name == "wandb" and cfg.logger.mode == "auto"
    assert cfg.data.path is None and cfg.data.seq_len == cfg.model.block_size


def test_offload_presets_move_state_to_cpu(compose):
    z2 = compose(["parallelism=zero2_offload"]).parallelism
    z3 = compose(["parallelism=zero3_offload"]).parallelism
    assert (z2.zero_stage, z2.offload_optimizer, z2.offload_param) == (2, "cpu", "none")
    assert (z3.zero_stage, z3.offload_optimizer, z3.offload_param) == (3, "cpu", "cpu")


def test_experiment_overrides_groups(compose):
    cfg = compose(["experiment=gpt2_small"])
    assert cfg.model.name == "gpt2-small" and cfg.trainer.grad_accum_steps == 4
    dbg = compose(["experiment=debug"])
    assert dbg.launcher.name == "local" and dbg.logger.name == "none"


def test_unknown_key_is_rejected_with_its_name(compose):
    with pytest.raises(ConfigCompositionException) as e:
        compose(["model.n_layr=3"])
    assert "n_layr" in str(e.value.__cause__ or e.value)


def test_wrong_type_is_rejected_with_its_name(compose):
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        compose(["trainer.max_steps=lots"])
    text = str(e.value) + str(e.value.__cause__)
    assert "max_steps" in text and "lots" in text


def expect_config_error(cfg: dict, key: str) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        cfg.check()
    assert e.value.key == key, str(e.value)
    assert "fix:" in str(e.value)
    return e.value


def test_n_embd_not_divisible_by_n_head(compose):
    err = expect_config_error(compose(["model.n_head=5"]), "model.n_head")
    assert "n_embd=64" in str(err) and "5" in str(err)


def test_seq_len_above_block_size(compose):
    expect_config_error(compose(["data.seq_len=256"]), "data.seq_len")


@pytest.mark.parametrize("key, value", [("optim.beta1", "-0.1"), ("optim.beta2", "1.5"), ("optim.beta2", "1"),
                                        ("optim.weight_decay", "-1"), ("optim.eps", "0"), ("optim.grad_clip", "-1"),
                                        ("optim.warmup_steps", "-5")])
def test_optimizer_settings_torch_would_reject(compose, key, value):
    err = expect_config_error(compose([f"{key}={value}"]), key)
    assert value in str(err)


def test_num_workers_below_one(compose):
    expect_config_error(compose(["launcher.num_workers=0"]), "launcher.num_workers")


@pytest.mark.parametrize("key,value,listed", [("launcher.placement_strategy", "spread_out", "STRICT_SPREAD"),
                                             ("precision.dtype", "fp8", "bf16"), ("data.on_error", "ignore", "skip"),
                                             ("logger.mode", "loud", "offline"), ("trainer.resume", "sometimes", "never")])
def test_unknown_choice_is_rejected_naming_the_key_and_the_choices(compose, key, value, listed):
    """Closed sets are enums in the schema: Hydra rejects an unknown value as it composes."""
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        compose([f"{key}={value}"])
    text = str(e.value) + str(e.value.__cause__)
    assert key.split(".")[-1] in text and value in text and listed in text


@pytest.mark.timeout(120)
@pytest.mark.parametrize("override,fix", [("trainer.resume=true", "trainer.resume=require"),
                                          ("trainer.resume=false", "trainer.resume=never"),
                                          ("trainer.resume=/some/step_000000010", "trainer.resume_from=/some/step_000000010"),
                                          ("launcher.use_gpu=auto", "launcher.use_gpu=null")])
def test_cli_explains_settings_whose_spelling_changed(tmp_path, override, fix, capsys):
    err = cli_error(tmp_path, capsys, override)
    assert fix in err and "Traceback" not in err


def test_local_launcher_is_one_process(compose):
    expect_config_error(compose(["launcher=local", "launcher.num_workers=2"]), "launcher.num_workers")


def test_param_offload_needs_stage3(compose):
    expect_config_error(compose(["parallelism=zero2", "parallelism.offload_param=cpu"]), "parallelism.offload_param")


def test_fp16_without_gpu_is_rejected(compose):
    cfg = compose(["precision=fp16"])
    cfg.check()  # statically fine; it is the hardware that rules it out
    with pytest.raises(ConfigError) as e:
        use_gpus(cfg, gpus_available=0)
    assert e.value.key == "precision" and "bf16" in str(e.value)
    assert use_gpus(cfg, gpus_available=2) is True


def test_gpu_asked_for_but_absent(compose):
    with pytest.raises(ConfigError) as e:
        use_gpus(compose(["launcher.use_gpu=true"]), gpus_available=0)
    assert e.value.key == "launcher.use_gpu"


def test_data_path_without_shards(tmp_path):
    from kiln.data.manifest import load_manifest
    from kiln.errors import DataError

    with pytest.raises(DataError) as e:
        load_manifest(tmp_path)
    assert str(tmp_path) in str(e.value) and "kiln-data" in str(e.value)


def check_data(cfg: dict) -> None:
    from kiln.data.plan import plan_data

    plan = plan_data(cfg, check_open=True)
    validate_data(cfg, plan.sources, plan.tokenizer)


def test_more_readers_than_shards(compose, small_dataset):
    from kiln.data.manifest import load_manifest

    shards = len(load_manifest(small_dataset).splits["train"])
    cfg = compose(["launcher.num_workers=2", f"data.num_workers={shards}", f"data.path={small_dataset}"])
    with pytest.raises(ConfigError) as e:
        check_data(cfg)
    assert e.value.key == "data.num_workers" and str(small_dataset) in str(e.value)
    check_data(compose(["launcher.num_workers=2", "data.num_workers=1", f"data.path={small_dataset}"]))


def test_model_vocab_smaller_than_tokenizer(compose, small_dataset):
    with pytest.raises(ConfigError) as e:
        check_data(compose(["model.vocab_size=100", f"data.path={small_dataset}"]))
    assert e.value.key == "model.vocab_size"


# --- the real CLI: errors come before any worker (or Ray) starts --------------------------

def cli_error(tmp_path: Path, capsys, *args: str) -> str:
    """kiln-train's main() in this process (the console script itself: the n_head test below)."""
    run = tmp_path / "run"
    code, out, err = main_in_process([*with_storage(list(args), run), f"hydra.run.dir={run}"], capsys)
    assert code == 2, f"exit {code}: {out}\n{err}"
    assert "Ray instance" not in out and "Started training worker group" not in out
    assert not (run / "metrics.jsonl").exists()
    return err


@pytest.mark.timeout(120)
def test_cli_n_head_error_before_workers(tmp_path):
    proc = kiln_train(["model=tiny", "model.n_head=5"], tmp_path / "run", timeout=120)
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stdout}\n{proc.stderr}"
    assert "Ray instance" not in proc.stdout and not (tmp_path / "run" / "metrics.jsonl").exists()
    err = proc.stderr
    assert "model.n_head" in err and "not divisible" in err
    assert "Traceback" not in err


@pytest.mark.timeout(120)
def test_cli_fp16_on_cpu_error_before_workers(tmp_path, small_dataset, capsys):
    err = cli_error(tmp_path, capsys, "precision=fp16", f"data.path={small_dataset}")
    assert "config error at `precision`" in err


@pytest.mark.timeout(120)
def test_cli_empty_data_path(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    err = cli_error(tmp_path, capsys, "launcher=local", f"data.path={empty}")
    assert f"data.path={empty}" in err and "no shards" in err


@pytest.mark.timeout(120)
def test_cli_num_workers_zero(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "launcher.num_workers=0")
    assert "launcher.num_workers" in err


@pytest.mark.timeout(120)
def test_cli_seq_len_error(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "data.seq_len=4096")
    assert "data.seq_len" in err and "block_size" in err


@pytest.mark.timeout(120)
def test_cli_cfg_job_prints_composed_config(capsys):
    code, out, err = main_in_process(["--cfg", "job", "model=gpt2-small"], capsys)
    assert code == 0, err
    assert "n_embd: 768" in out and "zero_stage: 2" in out


def test_negative_checkpoint_settings(compose):
    expect_config_error(compose(["trainer.checkpoint_interval=-1"]), "trainer.checkpoint_interval")
    expect_config_error(compose(["trainer.keep_checkpoints=-2"]), "trainer.keep_checkpoints")


@pytest.mark.timeout(120)
def test_cli_init_from_nonsense_fails_before_workers(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "launcher=local", f"model.init_from={tmp_path}")
    assert "model.init_from" in err and "neither a kiln checkpoint" in err


def test_ray_job_with_relative_output_paths_warns(compose, capsys, monkeypatch):
    from kiln.cli.train import warn_job_local_paths

    cfg = compose(["trainer.run_name=job"])
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    warn_job_local_paths(cfg, [])
    assert capsys.readouterr().out == ""  # not a Ray job: nothing to say
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    warn_job_local_paths(cfg, ["hydra.run.dir=outputs/x"])
    out = capsys.readouterr().out
    assert "hydra.run.dir and launcher.storage_path relative or unset" in out
    cfg.launcher.storage_path = "s3://bucket/ck"
    warn_job_local_paths(cfg, ["hydra.run.dir=/shared/out"])
    assert capsys.readouterr().out == ""
    cfg.trainer.run_name = None  # resubmitting an unnamed run would start over
    warn_job_local_paths(cfg, ["hydra.run.dir=/shared/out"])
    assert "without trainer.run_name" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, key", [
    (["model=llama-tiny", "model.bias=true"], "model.bias"),
    (["model=llama-tiny", "model.n_kv_head=3"], "model.n_kv_head"),
    (["model=llama-tiny", "model.n_head=64", "model.n_kv_head=null"], "model.n_head"),  # head size 1: odd
    (["model=llama-tiny", "model.rope_theta=0"], "model.rope_theta"),
    (["model=tiny", "model.n_kv_head=2"], "model.n_kv_head"),
    (["model=tiny", "model.tie_embeddings=false"], "model.tie_embeddings"),
    (["model.pad_vocab_multiple=0"], "model.pad_vocab_multiple"),
    (["parallelism.bucket_size=0"], "parallelism.bucket_size"),
    (["parallelism=zero3", "parallelism.param_persistence_threshold=-1"], "parallelism.param_persistence_threshold"),
])
def test_model_and_parallelism_settings_are_checked(compose, overrides, key):
    expect_config_error(compose(overrides), key)


def test_presets_build_their_models(compose):
    """GPT-2 presets pad the vocabulary to a multiple of 64; llama-1b is the ~1.2B recipe."""
    from kiln.model.config import LlamaConfig

    assert compose(["model=gpt2-small"]).model.build(50257).vocab_size == 50304
    assert compose(["model=gpt2-small", "model.pad_vocab_multiple=1"]).model.build(50257).vocab_size == 50257
    assert compose(["model=tiny"]).model.build(257).vocab_size == 257  # byte vocabulary kept as it is
    big = compose(["model=llama-1b"]).model.build(50257)
    assert isinstance(big, LlamaConfig) and (big.n_kv_head, big.ffn_hidden, big.vocab_size) == (8, 8192, 50304)
    default = compose(["model=llama-tiny", "model.ffn_hidden=null", "model.n_kv_head=null"]).model.build(257)
    assert (default.ffn_hidden, default.n_kv_head) == (256, 4)  # 8/3 * 64 -> 256; null kv heads = n_head


def test_redaction_of_credentials():
    from kiln.config.redact import redact

    secrets = [("s3cr3t-value", "MY_TOKEN")]
    got = redact({"path": "pipe:curl -H 'Bearer s3cr3t-value' https://h/x.tar",
                  "urls": ["https://user:pa55word@host/shards/{0..9}.tar", "https://h/a.tar?X-Amz-Signature=abc&part=1"],
                  "plain": "http://host/a.tar", "n": 3, "short": "true"}, secrets)
    assert got["path"] == "pipe:curl -H 'Bearer <redacted $MY_TOKEN>' https://h/x.tar"
    assert got["urls"] == ["https://user:<redacted>@host/shards/{0..9}.tar", "https://h/a.tar?X-Amz-Signature=<redacted>&part=1"]
    assert (got["plain"], got["n"], got["short"]) == ("http://host/a.tar", 3, "true")
