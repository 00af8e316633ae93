"""Shards from anywhere (vitbench.data.remote), against real servers on loopback: a threaded HTTP server that honours
Range and one that does not, with 503s, cut bodies, stalls and cross-origin redirects injected; a stand-in for the
Hub's API; moto's S3 server. Reads are byte-identical to the local copy, bounded in time when a server never
recovers, and what they lose is counted like any unreadable shard."""

import hashlib
import json
import os
import re
import shutil
import time

import pytest
import torch

from vitbench import cli, plan
from vitbench.data import prep, remote, shardread
from vitbench.data.remote import Location, LocationError, RemoteReadError, RetryPolicy, open_file
from vitbench.data.shardformat import INFO_FILE, DataError, load_split
from vitbench.data.shardread import Readers, StreamStart
from vitbench.data.transforms import eval_transform, train_transform
from vitbench.data.validation import ValidationStream, validation_loader
from vitbench.data.wds_loader import train_loader
from vitbench.errors import UserError
from vitbench.runinfo import MachineFacts
from vitbench.testing.servers import FileServer, GcsServer

FAST = RetryPolicy(attempts=4, backoff_s=0.01, stall_s=1.0)
CPU = MachineFacts("cpu", "a CPU", None, fp16=False, bf16=True, autocast=True, cpus=2)
ONE = {"WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}


@pytest.mark.parametrize("text, kind", [
    ("/data/imagenet-wds", "file"), ("relative/dir", "file"), ("https://example.org/wds/", "https"),
    ("http://127.0.0.1:8000/wds", "http"), ("s3://bucket/imagenet-wds", "s3"), ("gs://bucket/wds", "gs"),
    ("hf://datasets/timm/imagenet-1k-wds", "hf"), ("hf://datasets/timm/imagenet-1k-wds@v1.0/sub", "hf"),
])
def test_locations_that_are_read(text, kind):
    loc = remote.parse(text)
    assert loc.scheme == kind and loc.source == text
    assert loc.join("a b.tar").endswith("a%20b.tar" if loc.remote else "a b.tar")


@pytest.mark.parametrize("text, message", [
    ("pipe:curl -s https://x/a.tar", "'pipe:' is not a place shards are read from"),
    ("file:///data/wds", "'file:' is not a place"), ("ftp://host/wds", "'ftp:' is not a place"),
    ("https://user:secret@host/wds", "credentials do not belong in the URL"),
    ("s3://AKIA:secret@bucket/wds", "credentials do not belong in the URL"),
    ("https://host/wds?X-Amz-Signature=abc", "query string"), ("ftp://user:secret@host/wds", "'ftp:' is not"),
    ("http://example.org/wds", "plain http:// is only for a server on this machine"),
    ("hf://models/timm/vit", "hf://datasets/ORG/REPO"), ("s3://", "no host or bucket"),
])
def test_anything_else_is_refused_in_one_line_naming_it(text, message):
    with pytest.raises(LocationError, match=message) as e:
        remote.parse(text)
    assert not {"secret", "abc", "curl"} & set(re.findall(r"\w+", str(e.value)))  # never echoed
    assert len(str(e.value).splitlines()) == 1


def test_a_bad_retry_setting_is_refused_at_start(demo_shards):
    flags = cli.parse_args(["--data-dir", str(demo_shards), "--model", "vit_tiny_patch16_224"])
    with pytest.raises(UserError, match="VITBENCH_READ_STALL_S='soon' is not a number > 0"):
        plan.make_plan(flags, {**ONE, "VITBENCH_READ_STALL_S": "soon"}, CPU, cli.REPO)


@pytest.mark.parametrize("honour_range", [True, False], ids=["range", "no_range"])
def test_a_read_survives_503s_cut_bodies_and_a_stall_byte_identical(http, demo_shards, honour_range):
    server = http(honour_range=honour_range, stall_s=3)
    server.faults = ["503", "cut", "cut", "stall"]
    name = sorted(p.name for p in demo_shards.glob("*.tar"))[0]
    with open_file(f"{server.url}/{name}", FAST) as f:
        assert f.read() == (demo_shards / name).read_bytes()
    tries = [(r["range"], r["status"]) for r in server.requests]
    assert [status for _, status in tries][:2] == [503, 200] and len(tries) == 5
    if honour_range:  # resumed where each cut left off, each answer checked to start there
        assert all(rng and status == 206 for rng, status in tries[2:])
        starts = [int(rng.split("=")[1].rstrip("-")) for rng, _ in tries[2:]]
        assert starts == sorted(starts) and starts[0] > 0
    else:  # the whole file again each time: what was delivered is skipped, never taken for the rest
        assert all(status == 200 for _, status in tries[2:])


def test_a_slow_stream_that_moves_is_never_cut(http, demo_shards):
    """The stall limit ends a read that gets no byte for stall_s, not one that takes longer than stall_s."""
    server = http(stall_s=FAST.stall_s)
    server.faults = ["trickle"]  # 8 pieces, stall_s / 3 apart: about 2.7 x stall_s in all
    name = sorted(p.name for p in demo_shards.glob("*.tar"))[0]
    t = time.monotonic()
    with open_file(f"{server.url}/{name}", FAST) as f:
        assert f.read() == (demo_shards / name).read_bytes()
    assert time.monotonic() - t > 2 * FAST.stall_s and len(server.requests) == 1  # one request, never retried


def test_a_server_that_never_recovers_costs_bounded_time_and_counts_as_lost_samples(http, demo_shards,
                                                                                     monkeypatch):
    server = http()
    server.faults = ["503"] * 1000
    val = load_split(demo_shards, "validation")
    t = time.monotonic()
    with pytest.raises(RemoteReadError, match=r"unreadable after 4 attempts .* HTTP 503") as e:
        open_file(f"{server.url}/{os.path.basename(val.urls[0])}", FAST).read()
    assert isinstance(e.value, OSError) and time.monotonic() - t < 5
    # in a pass: that shard's samples are counted as skipped, the others are read
    monkeypatch.setenv("VITBENCH_READ_ATTEMPTS", "2")
    monkeypatch.setenv("VITBENCH_READ_BACKOFF_S", "0.01")
    server.faults = []
    remote_val = load_split(Location("http", server.url, server.url), "validation")
    server.faults = ["503"] * 2  # the first shard's two attempts
    stream = ValidationStream(remote_val, eval_transform(32), 4, rank=0, world_size=1, workers=1)
    with pytest.warns(UserWarning, match="unreadable after 2 attempts"):
        batches = list(validation_loader(stream))
    read = sum(len(b["keys"]) for b in batches)
    assert read == val.num_samples - val.lengths[0] and sum(b["skipped"] for b in batches) == val.lengths[0]


def keys_and_bytes(batches):
    return [(k, hashlib.sha256(img.numpy().tobytes()).hexdigest()) for b in batches
            for k, img in zip(b["keys"], b["images"] if b["images"] is not None else [])]


def test_two_forked_workers_read_http_and_s3_byte_identical_to_the_local_copy(http, demo_shards, s3, monkeypatch):
    server = http()
    s3_server, s3_root = s3
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.env["AWS_ENDPOINT_URL_S3"])
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(var, s3_server.env[var])
    for local, url in ((demo_shards, server.url), (s3_root, s3_server.url)):
        torch.manual_seed(0)
        want_val = keys_and_bytes(validation_loader(ValidationStream(
            load_split(local, "validation"), eval_transform(32), 4, 0, 1, workers=2)))
        got_val = keys_and_bytes(validation_loader(ValidationStream(
            load_split(url, "validation"), eval_transform(32), 4, 0, 1, workers=2)))
        assert got_val == want_val and len(got_val) == load_split(local, "validation").num_samples
        tf = train_transform(32, None)

        def train_keys(where):
            loader = train_loader(load_split(where, "train"), tf, batch_size=6, micro_batches=6,
                                  readers=Readers(0, 1, 2), seed=3, start=StreamStart(epoch=0))
            return [k for b in loader for k in b["keys"]]
        assert train_keys(url) == train_keys(local)
    assert load_split(s3_server.url, "train").info_sha256 == load_split(s3_root, "train").info_sha256


def test_the_hub_token_goes_to_the_hub_only_and_the_revision_is_pinned(demo_shards, http, monkeypatch):
    cdn = http()  # where the Hub redirects file downloads: another origin
    sha = "0123456789abcdef0123456789abcdef01234567"
    hub = FileServer(demo_shards, redirect_to=f"http://127.0.0.1:{cdn.port}", hub_sha=sha)
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.port}")
        monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
        loc = remote.pin(remote.parse("hf://datasets/org/shards@main/wds"))
        assert loc.revision == sha and f"/resolve/{sha}/wds" in loc.base and "secret" not in loc.base
        val = load_split(loc, "validation")
        with open_file(val.urls[0], FAST) as f:
            assert f.read() == (demo_shards / os.path.basename(val.urls[0])).read_bytes()
        hub_files = [r for r in hub.requests if "/resolve/" in r["path"]]
        assert hub_files and all(r["authorization"] == "Bearer hf_secret_token" for r in hub_files)
        assert cdn.requests and all(r["authorization"] is None for r in cdn.requests)
    finally:
        hub.close()


def test_gs_reads_through_the_xml_api_byte_identical(demo_shards, monkeypatch):
    server = GcsServer(demo_shards)
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.env["STORAGE_EMULATOR_HOST"])
        val = load_split(server.url, "validation")
        assert val.info_sha256 == load_split(demo_shards, "validation").info_sha256
        for url in val.urls:
            with open_file(url, FAST) as f:
                assert f.read() == (demo_shards / os.path.basename(url)).read_bytes()
    finally:
        server.close()


@pytest.mark.skipif(not os.environ.get("HF_TOKEN"), reason="live Hub test: needs HF_TOKEN (and network); "
                                                            "the Hub's protocol is tested on loopback above")
def test_live_hub_reads_timm_imagenet_1k_wds():
    loc = remote.pin(remote.parse("hf://datasets/timm/imagenet-1k-wds"))
    val = load_split(loc, "validation")
    first = next(shardread.tar_samples(val.urls[0], shardread.SkipLog()))
    assert "jpg" in first and len(loc.revision) == 40


def test_dali_on_a_remote_source_is_refused_in_one_line(http):
    server = http()
    flags = cli.parse_args(["--data-dir", server.url, "--loader", "dali", "--model", "vit_tiny_patch16_224"])
    with pytest.raises(UserError, match="--loader dali reads local shards only"):
        plan.make_plan(flags, ONE, CPU, cli.REPO)
    assert server.requests == []  # refused before any request


def test_verify_works_on_a_remote_location(demo_shards, tmp_path, http):
    copy = tmp_path / "copy"
    shutil.copytree(demo_shards, copy)
    server = FileServer(copy, prefix="wds")
    try:
        assert prep.verify(server.url, "validation") == []
        name = json.loads((copy / INFO_FILE).read_text())["splits"]["validation"]["filenames"][1]
        data = bytearray((copy / name).read_bytes())
        data[700] ^= 1
        (copy / name).write_bytes(bytes(data))
        assert prep.verify(server.url, "validation") == [f"{server.url}/{name}: sha256 differs from the one "
                                                         "recorded at write time"]
    finally:
        server.close()


def test_a_manifest_that_lies_is_refused_or_reported_when_seen(demo_shards, tmp_path):
    lying = tmp_path / "lying"
    shutil.copytree(demo_shards, lying)
    info = json.loads((lying / INFO_FILE).read_text())
    info["num_classes"] = 10**9  # a head the model cannot hold
    (lying / INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"num_classes 1000000000 is not an integer in \[1, 1,000,000\]"):
        load_split(lying, "train")
    info["num_classes"] = 10
    info["splits"]["validation"]["shard_lengths"][0] -= 1  # the shard holds one more than recorded
    (lying / INFO_FILE).write_text(json.dumps(info))
    val = load_split(lying, "validation")
    stream = ValidationStream(val, eval_transform(32), 4, rank=0, world_size=1, workers=1)
    with pytest.warns(UserWarning, match="holds more samples than the 6 that _info.json records"):
        batches = list(validation_loader(stream))
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == len(set(keys)) == val.num_samples  # counted once, never twice
    info["splits"]["validation"]["shard_lengths"][0] += 1
    info["splits"]["train"]["shard_lengths"][0] += 2  # promises two more than the shard holds
    (lying / INFO_FILE).write_text(json.dumps(info))
    train = load_split(lying, "train")
    with pytest.warns(UserWarning, match="ended after 7 samples; _info.json records at least 9"):
        list(train_loader(train, train_transform(32, None), batch_size=4, micro_batches=15, readers=Readers(0, 1, 0),
                          seed=0, start=StreamStart(epoch=0)))


