"""Where training data comes from: `data.path` (one source) or `data.mixture` (several, weighted).

A source is one of
    /data/owt                                  a directory written by kiln-data (its manifest.json)
    /data/owt/train-{000000..000099}.tar       a brace pattern of shards (manifest.json beside them)
    http://host/owt/train-{000000..000099}.tar shards over HTTP(S) (manifest fetched from beside them)
    pipe:aws s3 cp s3://b/owt/train-{000000..000099}.tar -   a shell command per shard, as WebDataset
                                               reads S3/GCS (needs `manifest:` naming where manifest.json is)
Every source needs its manifest: it names the tokenizer and token width, the validation shards,
and the shards' checksums, from which the stream fingerprint is made.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import subprocess
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from braceexpand import braceexpand
from webdataset.gopen import gopen  # (webdataset's package attribute `gopen` is the function)

from kiln.config.redact import redact_text
from kiln.data.manifest import load_manifest
from kiln.errors import ConfigError, DataError

REMOTE = ("http://", "https://", "pipe:")
TAR_NAME = re.compile(r"([\w.\-]+\.tar)\b")


@dataclass
class Source:
    name: str
    train: list[str]
    val: list[str]
    dtype: str
    tokenizer: dict
    root: str  # directory or base URL of the manifest (a saved tokenizer lives there)
    weight: float = 1.0
    checksums: list[str] = field(default_factory=list)
    documents: list[int] = field(default_factory=list)  # per train shard, from the manifest
    manifest_location: str = ""  # for remote sources: where manifest.json was read from
    shuffled: bool | None = None  # the manifest says kiln-data shuffled the documents (None: not recorded)
    sizes: dict[str, int] = field(default_factory=dict)  # bytes of each shard (train and val), from the manifest

    def to_stream(self, shuffle_documents: bool | None = None) -> dict:
        """What the stream reads of this source. shuffle_documents None (data.shuffle_documents=null):
        read each shard's documents in a seeded order per pass unless kiln-data already shuffled
        them when it wrote the shards (then their stored order is random, and read sequentially)."""
        if shuffle_documents is None:
            shuffle_documents = not self.shuffled
        return {"name": self.name, "shards": tuple(self.train), "dtype": self.dtype, "weight": self.weight,
                "documents": dict(zip(self.train, self.documents)), "shuffle_documents": bool(shuffle_documents)}


def _url_request(location: str) -> urllib.request.Request:
    """A request for `location`; user:password@ in it (which curl, reading the shards, accepts)
    becomes a basic-auth header, since urllib would take the password for a port."""
    parts = urllib.parse.urlsplit(location)
    if parts.username is None:
        return urllib.request.Request(location)
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    req = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=host)))
    user_pass = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
    req.add_header("Authorization", "Basic " + base64.b64encode(user_pass.encode()).decode())
    return req


def _read_text(location: str) -> str:
    if location.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(_url_request(location), timeout=30) as r:
                return r.read().decode()
        except http.client.HTTPException as e:  # not an OSError, but as much a failed fetch
            raise OSError(f"{type(e).__name__}: {e}") from e
    if location.startswith("pipe:"):
        out = subprocess.run(location[5:], shell=True, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise OSError(f"command exited {out.returncode}: {out.stderr.strip()[:200]}")
        return out.stdout
    return Path(location).expanduser().read_text()


def _manifest_location(path: str, manifest: str | None, key: str) -> str:
    if manifest:
        return manifest
    if path.startswith("pipe:"):
        raise ConfigError(key, f"source {path!r} is a pipe: command, so kiln cannot guess where its "
                          f"manifest.json is", "add `manifest:` with the manifest's path, URL or pipe: command")
    return path.rsplit("/", 1)[0] + "/manifest.json"


def resolve_source(path: str, *, manifest: str | None = None, weight: float = 1.0, name: str | None = None,
                   key: str = "data.path") -> Source:
    is_pattern = "{" in path or path.endswith(".tar")
    if not path.startswith(REMOTE) and not is_pattern and manifest is None:  # a kiln-data directory
        m = load_manifest(path)
        shards = m.splits["train"]
        sizes = {str(m.root / s.file): s.bytes for split in ("train", "val") for s in m.splits.get(split, [])}
        return Source(name or Path(path).name, m.urls("train"), m.urls("val"), m.token_dtype, m.tokenizer,
                      str(m.root), weight, [s.sha256 for s in shards], [s.documents for s in shards],
                      shuffled=m.build.get("shuffle"), sizes=sizes)

    location = _manifest_location(path, manifest, key)
    try:
        raw = json.loads(_read_text(location))
    except (OSError, ValueError) as e:
        raise DataError(redact_text(f"{key}: cannot read the manifest for {path!r} at {location!r} ({e}); "
                                    f"shards written by kiln-data have manifest.json beside them")) from e
    base = location.rsplit("/", 1)[0]
    splits = raw.get("splits", {})
    listed = {s["file"]: s for s in splits.get("train", [])}
    train = list(braceexpand(path))
    checksums, documents, sizes = [], [], {}
    for url in train:
        m = TAR_NAME.findall(url)
        if not m or m[-1] not in listed:
            raise DataError(f"{key}: shard {url!r} is not a training shard listed in {location}")
        checksums.append(listed[m[-1]]["sha256"])
        documents.append(listed[m[-1]]["documents"])
        if "bytes" in listed[m[-1]]:
            sizes[url] = listed[m[-1]]["bytes"]
    manifest_key = "data.manifest" if key == "data.path" else f"{key}.manifest"
    val_listed = splits.get("val", [])
    val = [beside_manifest(location, s["file"], manifest_key) for s in val_listed]
    sizes.update({url: s["bytes"] for url, s in zip(val, val_listed) if "bytes" in s})
    return Source(name or Path(base).name or "data", train, val, raw["token_dtype"], raw["tokenizer"], base,
                  weight, checksums, documents, location, shuffled=raw.get("build", {}).get("shuffle"), sizes=sizes)


MANIFEST_NAME = "manifest.json"


def beside_manifest(location: str, file: str, key: str = "data.manifest") -> str:
    """Where `file` (a shard or tokenizer.json the manifest names) is: the manifest lists files
    relative to itself. For a pipe: command that is the same command with the manifest's name
    replaced (`pipe:aws s3 cp s3://b/owt/manifest.json -` -> `... s3://b/owt/val-000000.tar -`)."""
    if not location.startswith("pipe:"):
        return location.rsplit("/", 1)[0] + "/" + file
    at = location.rfind(MANIFEST_NAME)
    if at < 0:
        raise ConfigError(key, f"the pipe: command {location!r} reading the manifest does not name "
                          f"{MANIFEST_NAME}, so kiln cannot derive the commands that read the files beside it "
                          f"(validation shards, tokenizer)",
                          f"give a command that names the manifest file, e.g. "
                          f"`pipe:aws s3 cp s3://bucket/owt/{MANIFEST_NAME} -`")
    return location[:at] + file + location[at + len(MANIFEST_NAME):]


def fetch_beside_manifest(source: Source, file: str, cache_dir: str) -> Path:
    """Copy a file that lies beside a remote source's manifest (its tokenizer.json) to the local
    cache, so that every rank loads the tokenizer the shards were written with."""
    remote = beside_manifest(source.manifest_location, file)
    local = Path(cache_dir).expanduser() / "remote" / hashlib.sha256(remote.encode()).hexdigest()[:16]
    local.mkdir(parents=True, exist_ok=True)
    try:
        text = _read_text(remote)
    except OSError as e:
        raise DataError(redact_text(f"cannot fetch {file} for source {source.name} from {remote!r}: {e}")) from e
    tmp = local / f"{file}.{os.getpid()}.tmp"
    tmp.write_text(text)
    os.replace(tmp, local / file)
    return local


def resolve_sources(data) -> list[Source]:
    """data.path or data.mixture (a DataConfig) -> Sources, all with the same tokenizer."""
    if data.mixture:
        if data.path is not None:
            raise ConfigError("data.mixture", "both data.path and data.mixture are set",
                              "use data.mixture alone (each entry has its own path), or set data.mixture=[]")
        sources = []
        for i, entry in enumerate(data.mixture):
            key = f"data.mixture[{i}]"
            if not entry.weight > 0:
                raise ConfigError(f"{key}.weight", f"must be positive, got {entry.weight}",
                                  "give every source a positive weight (they are normalised to sum to 1)")
            sources.append(resolve_source(_abs(entry.path), manifest=entry.manifest, weight=float(entry.weight),
                                          name=entry.name, key=key))
        first = sources[0]
        for i, s in enumerate(sources[1:], 1):
            if s.tokenizer != first.tokenizer:
                raise ConfigError(f"data.mixture[{i}].path",
                                  f"source {s.name} was tokenized with {s.tokenizer}, source {first.name} with "
                                  f"{first.tokenizer}", "prepare every mixture source with the same tokenizer")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            for i, s in enumerate(sources):
                s.name = f"{s.name}{i}"
        return sources
    if data.path is None:
        raise ConfigError("data.path", "no data configured", "set data.path to a kiln-data directory")
    return [resolve_source(_abs(data.path), manifest=data.manifest)]


def _abs(path: str) -> str:
    if path.startswith(REMOTE):
        return path
    return os.path.abspath(os.path.expanduser(path))


def fingerprint(sources: list[Source]) -> str:
    """Changes when any shard's content, the shard list, the tokenizer or the weights change."""
    h = hashlib.sha256()
    for s in sources:
        h.update(json.dumps({"tokenizer": s.tokenizer, "dtype": s.dtype, "weight": s.weight,
                             "shards": s.checksums}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def check_shards_open(sources: list[Source]) -> None:
    """Before launch: every local shard exists and has the size its manifest lists (a truncated
    or half-copied shard is named here, before any worker starts: a size is one stat, where a
    checksum would read the whole dataset); the first training and the first validation shard of
    each remote source open."""

    for s in sources:
        for split, urls in (("", s.train), ("validation ", s.val)):
            for url in urls:
                if url.startswith(REMOTE):
                    continue
                if not Path(url).is_file():
                    raise DataError(f"{split}shard {url} (source {s.name}) does not exist")
                expected, size = s.sizes.get(url), Path(url).stat().st_size
                if expected is not None and size != expected:
                    raise DataError(f"{split}shard {url} (source {s.name}) has {size:,} bytes, its manifest lists "
                                    f"{expected:,}: an incomplete or changed copy; copy it again from the dataset's "
                                    f"origin, or rebuild the dataset with kiln-data")
            remote = [u for u in urls if u.startswith(REMOTE)]
            if remote:
                try:
                    with gopen(remote[0]) as f:
                        head = f.read(512)
                except Exception as e:
                    raise DataError(f"{split}shard {remote[0]} (source {s.name}) cannot be opened: {e}") from e
                if len(head) < 512:
                    raise DataError(f"{split}shard {remote[0]} (source {s.name}) is not a tar file "
                                    f"(read {len(head)} bytes)")
