"""Training from remote shards (real loopback HTTP and S3 servers, tests/conftest.py): a run from each equals the
run from the local copy."""

import pytest

from conftest import TINY, launch_together, results


@pytest.mark.slow  # a training launch
def test_a_run_from_http_and_from_s3_equals_the_run_from_the_local_copy(demo_shards, tmp_path, http, s3):
    """Same seed, same data: the same top-1 and loss, every validation image once; the HTTP server answers 503
    twice and cuts two responses mid-shard."""
    server = http()
    server.faults = ["503", "503", "cut", "cut"]
    server.fault_on = r"-000[1-9]\.tar$"  # not the first shards, whose headers the Plan reads: mid-training
    s3_server, _ = s3
    common = [*TINY, "--batch-size", "8", "--global-batch-size", "16", "--epochs", "1", "--max-steps", "3",
              "--wandb", "off"]
    sources = {"local": (str(demo_shards), {}), "http": (server.url, {"VITBENCH_READ_BACKOFF_S": "0.01"}),
               "s3": (s3_server.url, s3_server.env)}
    launch_together([([*common, "--data-dir", where, "--output-dir", str(tmp_path / name)], env)
                     for name, (where, env) in sources.items()])  # results and requests compared, no timing
    runs = {name: results(tmp_path / name) for name in sources}
    local = runs["local"]
    assert local["eval_samples"] == local["val_num_samples"] > 0
    for name in ("http", "s3"):
        r = runs[name]
        assert (r["final_acc1"], r["val_loss"], r["eval_samples"]) == (local["final_acc1"], local["val_loss"],
                                                                       local["eval_samples"]), name
        assert r["skipped_corrupt"] == {"train": 0, "validation": 0}
        assert r["plan"]["data"]["info_sha256"] == local["plan"]["data"]["info_sha256"]
    assert runs["s3"]["plan"]["data"]["source"] == s3_server.url
    statuses = [r["status"] for r in server.requests if r["path"].endswith(".tar")]
    resumed = [r for r in server.requests if r["range"]]
    assert statuses.count(503) == 2 and len(resumed) == 2 and {r["status"] for r in resumed} == {206}
