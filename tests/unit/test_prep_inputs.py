"""Shard prep accounts for every input file: nested folders, non-images, ILSVRC2012's flat validation folder
(devkit, Kaggle CSV or plain labels), and no traceback for any malformed _info.json or class index. Real files,
real tars, in-process (milliseconds to a second each)."""

import json
import shutil

import numpy as np
import pytest

from vitbench.data import demo, prep, remote, shardformat, shardread
from vitbench.errors import UserError


def samples(out, split):
    s = shardformat.load_split(str(out), split)
    return [x for url in s.urls for x in shardread.tar_samples(url, shardread.SkipLog())], s


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    demo.make_imagefolder(root, train_per_class=2, val_per_class=1, seed=3)
    return root


def test_images_in_nested_folders_of_a_class_are_written(folder, tmp_path):
    src = tmp_path / "train"
    shutil.copytree(folder / "train", src)
    cls = sorted(p for p in src.iterdir())[0]
    (cls / "extra" / "deeper").mkdir(parents=True)
    first = sorted(cls.glob("*.JPEG"))[0]
    shutil.copy(first, cls / "extra" / "deeper" / "nested.JPEG")
    (cls / ".hidden").mkdir()
    shutil.copy(first, cls / ".hidden" / "ignored.JPEG")  # hidden folders stay out, as hidden files do
    entry = prep.prepare(src, tmp_path / "out", "train", name="t", shard_size=5, workers=1, progress=False)
    got, _ = samples(tmp_path / "out", "train")
    assert entry["num_samples"] == len(got) == 2 * len(demo.PHOTOS) + 1 and not entry["skipped"]
    paths = {json.loads(s["json"])["path"] for s in got}
    assert f"{cls.name}/extra/deeper/nested.JPEG" in paths


def test_a_folder_of_non_images_is_one_line_and_leaves_no_tar(tmp_path):
    src = tmp_path / "src" / "n01440764"
    src.mkdir(parents=True)
    for i in range(3):
        (src / f"notes_{i}.txt").write_text("not an image")
    out = tmp_path / "out"
    with pytest.raises(prep.PrepError) as e:
        prep.prepare(src.parent, out, "train", name="t", shard_size=2, workers=1, progress=False)
    message = str(e.value)
    assert "no readable image among 3 file(s)" in message and "not an image PIL can read" in message
    assert "object at 0x" not in message and "<_io" not in message
    assert not list(out.glob("*.tar")) and not (out / "_info.json").exists()


def test_a_shard_of_only_unreadable_files_is_not_listed_and_its_files_are(folder, tmp_path):
    src = tmp_path / "train"
    shutil.copytree(folder / "train", src)
    cls = sorted(src.iterdir())[0]
    for i in range(12):  # enough bad files that some shard holds nothing else
        (cls / f"zz_bad_{i:02d}.JPEG").write_bytes(b"garbage")
    entry = prep.prepare(src, tmp_path / "out", "train", name="t", shard_size=1, workers=1, progress=False)
    assert len(entry["skipped"]) == 12 and all("object at 0x" not in s["reason"] for s in entry["skipped"])
    assert len(entry["filenames"]) == entry["num_samples"] == 2 * len(demo.PHOTOS)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == sorted(entry["filenames"])
    assert all(n > 0 for n in entry["shard_lengths"])


def _flat_validation(folder, tmp_path):
    """ILSVRC2012's validation set as distributed: one flat folder, ILSVRC2012_val_<N>.JPEG."""
    flat, truth = tmp_path / "val", []
    flat.mkdir()
    for n, f in enumerate(sorted((folder / "validation").rglob("*.JPEG")), 1):
        shutil.copy(f, flat / f"{prep.VAL_PREFIX}{n:08d}.JPEG")
        truth.append(f.parent.name)
    return flat, truth


def test_a_flat_validation_folder_with_plain_or_kaggle_labels_gets_the_train_splits_indices(folder, tmp_path):
    out = tmp_path / "out"
    prep.prepare(folder / "train", out, "train", name="t", shard_size=4, workers=1, progress=False)
    flat, truth = _flat_validation(folder, tmp_path)
    plain = tmp_path / "labels.txt"
    plain.write_text("".join(f"{prep.VAL_PREFIX}{n:08d}.JPEG {w}\n" for n, w in enumerate(truth, 1)))
    kaggle = tmp_path / "LOC_val_solution.csv"
    kaggle.write_text("ImageId,PredictionString\n" + "".join(
        f"{prep.VAL_PREFIX}{n:08d},{w} 1 2 3 4 {w} 5 6 7 8\n" for n, w in enumerate(truth, 1)))
    assert prep.read_val_labels(plain) == prep.read_val_labels(kaggle)
    prep.prepare(flat, out, "validation", name="t", shard_size=4, workers=1, progress=False, val_labels=kaggle)
    info = json.loads((out / "_info.json").read_text())
    got, _ = samples(out, "validation")
    classes = info["classes"]
    assert len(got) == len(truth)
    for s in got:  # each image's label is its class's index in the train split's class list
        n = int(s["__key__"].removeprefix(prep.VAL_PREFIX))
        assert classes[int(s["cls"])] == truth[n - 1]


def test_the_devkits_labels_are_read_through_its_meta_mat(folder, tmp_path):
    from scipy.io import savemat

    flat, truth = _flat_validation(folder, tmp_path)
    wnids = sorted(set(truth))
    # meta.mat's synsets: ILSVRC2012_IDs that are not sorted-wnid order, plus a non-leaf (num_children > 0)
    ids = {w: 10 * (len(wnids) - i) for i, w in enumerate(wnids)}
    rows = [(ids[w], w, "words", "gloss", 0) for w in wnids] + [(1001, "n00000001", "a parent", "", 3)]
    synsets = np.array(rows, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"),
                                    ("num_children", "O")])
    devkit = tmp_path / "ILSVRC2012_devkit_t12"
    (devkit / "data").mkdir(parents=True)
    savemat(devkit / "data" / "meta.mat", {"synsets": synsets})
    (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[w]}\n" for w in truth))
    labels = prep.read_val_labels(devkit)
    assert labels == {f"{prep.VAL_PREFIX}{n:08d}": w for n, w in enumerate(truth, 1)}


def test_a_devkit_that_is_not_one_is_one_line(tmp_path):
    devkit = tmp_path / "ILSVRC2012_devkit_t12"
    (devkit / "data").mkdir(parents=True)
    with pytest.raises(prep.PrepError, match="not an ILSVRC2012 devkit folder"):
        prep.read_val_labels(devkit)
    (devkit / "data" / "meta.mat").write_text("garbage")
    (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n")
    with pytest.raises(prep.PrepError, match="cannot read its labels"):
        prep.read_val_labels(devkit)


@pytest.mark.parametrize("text, message", [("ILSVRC2012_val_00000001.JPEG\n", "line 1 is not `<image> <wnid>`"),
                                           ("a.JPEG c/at\n", "line 1 is not"), ("\n", "holds no `<image> <wnid>`")])
def test_malformed_val_labels_are_one_line_naming_the_file_and_line(tmp_path, text, message):
    path = tmp_path / "labels.txt"
    path.write_text(text)
    with pytest.raises(prep.PrepError, match=message) as e:
        prep.read_val_labels(path)
    assert str(path) in str(e.value)


def test_an_unlabelled_image_in_the_flat_folder_is_refused_naming_it(folder, tmp_path):
    flat, truth = _flat_validation(folder, tmp_path)
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{prep.VAL_PREFIX}{n:08d} {w}\n" for n, w in enumerate(truth[:-1], 1)))
    with pytest.raises(prep.PrepError, match=f"1 file\\(s\\) have no label in --val-labels \\(first: "
                                             f"{prep.VAL_PREFIX}{len(truth):08d}.JPEG\\)"):
        prep.prepare(flat, tmp_path / "out", "validation", shard_size=4, workers=1, progress=False, val_labels=labels)


@pytest.mark.parametrize("content", ["[" * 100_000 + "]" * 100_000, '{"splits":' * 50_000 + "1" + "}" * 50_000,
                                     b"\xff\xfe{\x00", '{"num_classes": 1e999, "splits": {}}'],
                         ids=["deep-list", "deep-object", "not-utf8", "infinite"])
def test_no_info_file_or_class_index_of_any_shape_ends_in_a_traceback(tmp_path, content):
    path = tmp_path / "_info.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError, match=str(path)):  # the trainer refuses each of them
        shardformat.load_split(remote.parse(str(tmp_path)), "train")
    for read in (lambda: prep.read_info(path, "t"), lambda: prep.read_class_index(path)):
        try:  # prep may take what it can use (it rewrites num_classes); what it refuses is one line naming the file
            read()
        except UserError as e:
            assert str(path) in str(e)
    assert prep.verify(tmp_path, "train")  # problems listed, no exception
