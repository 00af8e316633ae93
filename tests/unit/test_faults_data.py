"""Fault suite, data side: hostile shard names and tar members, bad labels, unreadable and truncated
shards, prep on a bad or full --out, W&B unreachable, and the precision branch that depends on the CPU.
Real tars, real webdataset, real accelerate/DeepSpeed launches; nothing mocked."""

import io
import json
import shutil
import subprocess
import tarfile
import time
import warnings

import pytest

from vitbench.data import demo, prep, shardformat, shardread, transforms, validation, wds_loader
from vitbench.data.shardread import Readers, StreamStart

from conftest import BIN, REPO, copy_shards, info, remount, run_command, run_env, write_info


def keys_and_skipped(shards: shardformat.ShardSet, workers: int = 1):
    stream = validation.ValidationStream(shards, transforms.eval_transform(32), batch_size=4, rank=0, world_size=1,
                                   workers=workers)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(validation.validation_loader(stream))
    return ([k for b in batches for k in b["keys"]], sum(b["skipped"] for b in batches),
            [str(w.message) for w in caught])


def rewrite_shard(src_url: str, dst, change=lambda i, s: s, extra=()):
    """Copy a shard sample by sample through CHANGE, then append raw EXTRA tar members."""
    with tarfile.open(dst, "w") as out:
        for i, s in enumerate(shardread.tar_samples(src_url, shardread.SkipLog())):
            s = change(i, s)
            for ext in ("jpg", "cls"):
                ti = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                ti.size = len(s[ext])
                out.addfile(ti, io.BytesIO(s[ext]))
        for ti, payload in extra:
            out.addfile(ti, io.BytesIO(payload) if payload is not None else None)


# ---- 1. shard names are files under the data directory, nothing else ----------------------------
@pytest.mark.parametrize("name", ["pipe:touch PWNED", "/etc/passwd", "../outside.tar", "file:///etc/hosts",
                                  "sub/../../x.tar", "~/x.tar"])
def test_hostile_shard_names_are_refused_before_any_work(demo_shards, tmp_path, name):
    shards = copy_shards(demo_shards, tmp_path / "d")
    meta = info(shards)
    meta["splits"]["train"]["filenames"][0] = name
    write_info(shards, meta)
    with pytest.raises(shardformat.DataError, match="not a plain relative file name") as e:
        shardformat.load_split(shards, "train")
    assert str(shards / "_info.json") in str(e.value) and repr(name) in str(e.value)


def test_foreign_tar_members_are_skipped_and_counted_never_samples(demo_shards, tmp_path):
    val = shardformat.load_split(demo_shards, "validation")
    bad = tmp_path / "bad-0000.tar"

    def member(name, kind=tarfile.REGTYPE, payload=b"x", link=""):
        ti = tarfile.TarInfo(name)
        ti.type, ti.linkname = kind, link
        ti.size = len(payload) if kind == tarfile.REGTYPE else 0
        return ti, payload if kind == tarfile.REGTYPE else None

    jpg = next(shardread.tar_samples(val.urls[0], shardread.SkipLog()))["jpg"]
    extra = [member("../evil.jpg", payload=jpg), member("../evil.cls", payload=b"1"),
             member("/abs.jpg", payload=jpg), member("dir/x.jpg", payload=jpg),
             member("link.jpg", tarfile.SYMTYPE, link="/etc/passwd"), member("dev.jpg", tarfile.CHRTYPE)]
    rewrite_shard(val.urls[0], bad, extra=extra)
    n = val.lengths[0]
    keys, skipped, msgs = keys_and_skipped(shardformat.ShardSet("validation", [str(bad)], [n], 10))
    assert len(keys) == n and not {"evil", "abs", "x", "link", "dev"} & set(keys)
    assert skipped == 5  # ../evil (2 members, one sample), /abs, dir/x, the link, the device
    assert any("'../evil.jpg'" in m and str(bad) in m for m in msgs)


# ---- 2. bad data never crashes a long run late -------------------------------------------------
def test_bad_labels_are_dropped_with_a_warning_naming_shard_and_key(demo_shards, tmp_path):
    val = shardformat.load_split(demo_shards, "validation")
    bad = tmp_path / "bad-0000.tar"
    labels = {1: b"99", 2: b"-1", 3: b"cat"}
    names = {}

    def change(i, s):
        if i in labels:
            names[i] = s["__key__"]
            s = {**s, "cls": labels[i]}
        return s

    rewrite_shard(val.urls[0], bad, change)
    n = val.lengths[0]
    keys, skipped, msgs = keys_and_skipped(shardformat.ShardSet("validation", [str(bad)], [n], 10))
    assert len(keys) == n - 3 and skipped == 3 and not set(names.values()) & set(keys)
    for key in names.values():
        assert any(key in m and str(bad) in m and "not a class index in [0, 10)" in m for m in msgs), key
    # the train reader drops them too: every label it yields is a class index
    loader = wds_loader.train_loader(shardformat.ShardSet("train", [str(bad)], [n], 10), transforms.train_transform(32, None),
                               batch_size=4, micro_batches=4, readers=Readers(0, 1, 0), seed=0, start=StreamStart(epoch=0))
    batches = list(loader)
    assert all(0 <= int(y) < 10 for b in batches for y in b["labels"])
    assert not set(names.values()) & {k for b in batches for k in b["keys"]}


@pytest.mark.parametrize("change", [lambda i, s: {**s, "cls": b"99"}, lambda i, s: {**s, "jpg": b"not a jpeg"}],
                         ids=["every_label_out_of_range", "every_image_undecodable"])
def test_shards_without_one_usable_sample_end_the_stream_with_an_error_not_a_spin(demo_shards, tmp_path, change):
    """Readable tars, nothing trainable: the reader stops after a bounded run of drops, naming a shard."""
    train = shardformat.load_split(demo_shards, "train")
    urls = []
    for i, url in enumerate(train.urls[:3]):
        urls.append(str(tmp_path / f"bad-{i:04d}.tar"))
        rewrite_shard(url, urls[-1], change)
    loader = wds_loader.train_loader(shardformat.ShardSet("train", urls, train.lengths[:3], 10),
                                     transforms.train_transform(32, None), batch_size=4, micro_batches=4,
                                     readers=Readers(0, 1, 0), seed=0, start=StreamStart(epoch=0))
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(shardformat.DataError, match=f"{shardread.MAX_CONSECUTIVE_BAD_SAMPLES} samples in a row could not "
                                                 f"be used, the last .* of {tmp_path}/bad-000"):
            next(iter(loader))
    assert time.time() - t0 < 120


def test_labels_under_another_extension_are_named_and_never_spin(demo_shards, tmp_path):
    """A shard whose labels are `.label` members, not `.cls`: each sample is dropped saying what it holds."""
    val = shardformat.load_split(demo_shards, "validation")
    odd = tmp_path / "odd-0000.tar"
    with tarfile.open(odd, "w") as out:
        for s in shardread.tar_samples(val.urls[0], shardread.SkipLog()):
            for ext, payload in (("jpg", s["jpg"]), ("label", s["cls"])):
                ti = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                ti.size = len(payload)
                out.addfile(ti, io.BytesIO(payload))
    keys, skipped, msgs = keys_and_skipped(shardformat.ShardSet("validation", [str(odd)], [val.lengths[0]], 10))
    assert keys == [] and skipped == val.lengths[0]
    assert "no .cls label or no .jpg image (members: ['jpg', 'label'])" in msgs[0]


def test_demo_never_replaces_a_directory_it_did_not_make(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(prep.PrepError, match=f"{mine}: exists and is not a demo shard directory"):
        demo.build(mine, train_per_class=1, val_per_class=1, progress=False)
    assert (mine / "thesis.tex").read_text() == "years of work"
    proc = subprocess.run([str(BIN / "python"), "-m", "vitbench.data.demo", "--out", str(mine)], cwd=REPO,
                          env=run_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {mine}: exists and is not a demo shard directory (no demo.json); refusing to replace it: pick "
        "another --out"]


def test_prep_refuses_a_class_index_that_would_write_bad_labels(tmp_path):
    src = tmp_path / "src"
    demo.make_imagefolder(src, train_per_class=1, val_per_class=0, seed=1)
    classes = sorted(d.name for d in (src / "train").iterdir())
    for mapping, message in [({c: i - 1 for i, c in enumerate(classes)}, "indices must be integers >= 0"),
                             ({c: 0 for c in classes}, "share index 0")]:
        index = tmp_path / "index.json"
        index.write_text(json.dumps(mapping))
        proc = run_command("prep_shards", "--src", src / "train", "--out", tmp_path / "out", "--split", "train",
                           "--class-index", index)
        assert proc.returncode == 2 and str(index) in proc.stderr and message in proc.stderr
        assert not list((tmp_path / "out").glob("*.tar"))


def test_prep_gives_colliding_file_names_distinct_keys(tmp_path):
    src = tmp_path / "src" / "n01"
    src.mkdir(parents=True)
    demo.make_imagefolder(tmp_path / "f", train_per_class=2, val_per_class=0, seed=2)
    a, b = sorted((tmp_path / "f" / "train").glob("*/*.JPEG"))[:2]
    shutil.copy(a, src / "x.y.JPEG")
    shutil.copy(b, src / "x_y.JPEG")
    prep.prepare(src.parent, tmp_path / "out", "train", name="t", shard_size=10, workers=1, progress=False)
    samples = [s for p in sorted((tmp_path / "out").glob("*.tar")) for s in shardread.tar_samples(str(p), shardread.SkipLog())]
    assert len(samples) == 2 and len({s["__key__"] for s in samples}) == 2
    assert {s["jpg"] for s in samples} == {a.read_bytes(), b.read_bytes()}


def test_prep_on_a_bad_or_full_out_is_a_clear_error_and_a_rerun_resumes(tmp_path, small_fs):
    src = tmp_path / "src"
    demo.make_imagefolder(src, train_per_class=6, val_per_class=0, seed=4)
    cmd = ["--src", src / "train", "--split", "train", "--shard-size", "4", "--workers", "1"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out, message in [(a_file, "is not a directory"), (small_fs(1 << 20, ro=True), "not writable")]:
        proc = run_command("prep_shards", *cmd, "--out", out)
        assert proc.returncode == 2 and str(out) in proc.stderr and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    total = sum(f.stat().st_size for f in (src / "train").rglob("*.JPEG"))
    fs = small_fs(total // 2)  # fills up half way
    proc = run_command("prep_shards", *cmd, "--out", fs)
    assert proc.returncode == 2 and "No space left on device" in proc.stderr and "re-run" in proc.stderr
    assert "Traceback" not in proc.stderr
    kept = sorted(p.name for p in fs.glob("*.tar"))
    assert not list(fs.glob(".*.tmp*")), "no half-written shard may stay"
    mtimes = {n: (fs / n).stat().st_mtime_ns for n in kept}
    remount(fs, total * 3)
    proc = run_command("prep_shards", *cmd, "--out", fs)
    assert proc.returncode == 0, proc.stderr
    assert all((fs / n).stat().st_mtime_ns == t for n, t in mtimes.items()), "completed shards are kept"
    assert run_command("prep_shards", "--out", fs, "--split", "train", "--verify").returncode == 0
    assert info(fs)["splits"]["train"]["num_samples"] == 60


@pytest.mark.parametrize("change, message", [
    (lambda split: split["shard_lengths"].__setitem__(0, float("inf")), "shard length inf; lengths are integers"),
    (lambda split: split["shard_lengths"].__setitem__(0, -3), "shard length -3"),
    (lambda split: split["shard_lengths"].__setitem__(0, 2.5), "shard length 2.5"),
    (lambda split: split["filenames"].__setitem__(1, split["filenames"][0]), "more than once"),
])
def test_a_manifest_that_lies_is_refused_naming_the_file(demo_shards, tmp_path, change, message):
    """_info.json as JSON allows it (Infinity included): refused at start, never a traceback or a double count."""
    shards = copy_shards(demo_shards, tmp_path / "d")
    meta = info(shards)
    change(meta["splits"]["validation"])
    (shards / "_info.json").write_text(json.dumps(meta))  # json writes inf as Infinity
    with pytest.raises(shardformat.DataError, match=message) as e:
        shardformat.load_split(shards, "validation")
    assert str(shards / "_info.json") in str(e.value)


def test_prep_refuses_a_malformed_info_file_or_class_index_naming_it(tmp_path):
    from vitbench.data import prep

    src = tmp_path / "src"
    demo.make_imagefolder(src, train_per_class=1, val_per_class=0, seed=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "_info.json").write_text('{"splits": ')
    with pytest.raises(prep.PrepError, match=f"{out / '_info.json'}: not valid JSON"):
        prep.prepare(src / "train", out, "train", progress=False)
    (out / "_info.json").write_text('["a list"]')
    with pytest.raises(prep.PrepError, match="not an _info.json object"):
        prep.prepare(src / "train", out, "train", progress=False)
    assert (out / "_info.json").read_text() == '["a list"]' and not list(out.glob("*.tar")), "nothing overwritten"
    index = tmp_path / "index.json"
    index.write_text("{not json")
    with pytest.raises(prep.PrepError, match=f"{index}: not valid JSON"):
        prep.read_class_index(index)
