"""What is checked of a dataset from elsewhere before it is used: every local shard's size
against its manifest (named before any worker starts, for kiln-data directories and brace
patterns alike), every checksum (kiln-data verify), and the manifest's tokenizer file name."""

import shutil

import pytest

from kiln.data.manifest import load_manifest
from kiln.data.plan import plan_data
from kiln.errors import DataError


@pytest.fixture
def copy(tmp_path, small_dataset):
    out = tmp_path / "copy"
    shutil.copytree(small_dataset, out)
    return out


def cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return len(data)


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_truncated_shard_is_named_before_launch(compose, copy, split):
    victim = copy / load_manifest(copy).splits[split][-1].file
    full = cut_in_half(victim)
    with pytest.raises(DataError) as e:
        plan_data(compose([f"data.path={copy}"]), check_open=True)
    text = str(e.value)
    assert str(victim) in text and f"its manifest lists {full:,}" in text and f"{full // 2:,} bytes" in text
    assert "copy it again" in text


def test_a_truncated_shard_of_a_brace_pattern_is_named(compose, copy):
    shards = load_manifest(copy).splits["train"]
    victim = copy / shards[1].file
    cut_in_half(victim)
    pattern = f"{copy}/train-{{000000..{len(shards) - 1:06d}}}.tar"
    with pytest.raises(DataError, match=f"shard {victim} .*has"):
        plan_data(compose([f"data.path='{pattern}'"]), check_open=True)


def test_intact_shards_plan(compose, copy):
    plan = plan_data(compose([f"data.path={copy}"]), check_open=True)
    assert plan.sources[0].sizes and all(v > 0 for v in plan.sources[0].sizes.values())


def test_kiln_data_verify_checks_every_checksum(copy, tmp_path, capsys):
    from kiln.cli.data import main

    assert main(["verify", str(copy)]) == 0
    assert "every size and sha256 matches" in capsys.readouterr().out
    # One byte changed in place: the size still matches (kiln-train's pre-launch check passes), the sha256 not.
    victim = copy / load_manifest(copy).splits["val"][0].file
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert main(["verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert f"bad shard: {victim}: sha256" in err and "1 of" in err and "copy them again" in err
    assert main(["verify", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["../../etc/cron.d/x", "/tmp/t.json", "t.json; touch /tmp/owned", ".hidden", ""])
def test_a_manifests_tokenizer_file_must_be_a_plain_name(tmp_path, name):
    """Neither joined into a local path (`../` would write anywhere) nor into a pipe: command."""
    from kiln.data.plan import load_source_tokenizer
    from kiln.data.sources import Source
    from kiln.data.tokenizer import tokenizer_from_manifest

    entry = {"type": "bpe", "file": name, "vocab_size": 300, "eos_id": 0}
    with pytest.raises(DataError, match="not a plain file name"):
        tokenizer_from_manifest(entry, tmp_path)
    remote = Source("r", ["pipe:cat /x/train-000000.tar"], [], "uint16", entry, "pipe:cat /x",
                    manifest_location="pipe:cat /x/manifest.json")
    with pytest.raises(DataError, match="not a plain file name"):
        load_source_tokenizer(remote, str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()  # refused before anything was fetched or written
