"""ImageFolder tree -> WebDataset tar shards plus timm's `_info.json`.

Layout written (the same as the public `timm/imagenet-1k-wds` dataset):
  OUT/{name}-{split}-{NNNN}.tar   samples: __key__, jpg, cls (index as text), json
  OUT/_info.json                  {"name", "num_classes", "classes", "splits": {SPLIT: {...}}}
  OUT/.prep/{shard}.json          per-shard completion record (count, sha256, skipped files)

A shard is written under a temporary name and renamed when complete, and its completion record is
written after the rename; a shard without a matching record is rebuilt. So a prep killed at any
point (even SIGKILL) resumes by rebuilding only the unfinished shards.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import re
import tarfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from vitbench.data import shardformat
from vitbench.data.remote import open_file, parse
from vitbench.data.shardformat import INFO_FILE, DataError, parse_info, split_digests, split_entry, split_member
from vitbench.errors import UserError
from vitbench.files import loads, writable_problem, write_json_atomic

DEFAULT_SHARD_SIZE = 1252  # 1,281,167 / 1252 -> 1024 train shards, as timm/imagenet-1k-wds
JPEG_QUALITY = 90
# Image modes that convert("RGB") renders faithfully (what the readers do); others are skipped and listed.
FAITHFUL_MODES = {"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr"}


class PrepError(UserError):
    """Bad input detected before any shard is written."""


@dataclass(frozen=True)
class Source:
    path: str  # relative to --src
    wnid: str
    cls: int
    key: str


def read_info(info_path: Path, name: str) -> dict:
    """The `_info.json` already in --out (the other split's), or a new one; a malformed one is refused, never
    overwritten: it may describe shards that are there."""
    if not info_path.is_file():
        return {"name": name, "splits": {}}
    try:
        return parse_info(info_path.read_bytes(), info_path)
    except DataError as e:
        raise PrepError(f"{e}; fix or remove it, or use a new --out") from None


def read_class_index(path: Path) -> dict[str, int]:
    """`--class-index`: a JSON object {wnid: index} or a text file with one wnid per line."""
    if not path.is_file():
        raise PrepError(f"{path}: class-index file not found")
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise PrepError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix == ".json":
        try:
            mapping = loads(text)
        except ValueError as e:
            raise PrepError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(mapping, dict):
            raise PrepError(f"{path}: expected a JSON object {{wnid: index}}")
        return check_class_index(mapping, path)
    wnids = [line.split()[0] for line in text.splitlines() if line.strip()]
    return check_class_index({w: i for i, w in enumerate(wnids)}, path)


def check_class_index(mapping: dict, path: Path) -> dict[str, int]:
    """Every label we write is a class index in [0, num_classes): refuse a mapping that breaks that."""
    out = {}
    for wnid, idx in mapping.items():
        if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
            raise PrepError(f"{path}: class '{wnid}' has index {idx!r}; indices must be integers >= 0")
        out[str(wnid)] = idx
    dupes = sorted({i for i in out.values() if list(out.values()).count(i) > 1})
    if dupes:
        raise PrepError(f"{path}: several classes share index {dupes[0]}; each class needs its own index")
    return out


def scan_sources(src: Path, class_index: dict[str, int] | None = None,
                 labels: dict[str, str] | None = None) -> tuple[list[Source], list[str]]:
    """List every image of an ImageFolder tree, or of a flat folder whose files LABELS ({file stem: wnid},
    read_val_labels) names; returns (sources sorted by path, class names by index)."""
    if not src.exists():
        raise PrepError(f"{src}: source directory does not exist")
    if not src.is_dir():
        raise PrepError(f"{src}: source is not a directory")
    found = _labelled_files(src, labels) if labels is not None else _class_folder_files(src)
    wnids = sorted({wnid for _, wnid, _ in found})
    if class_index is None:
        class_index = {wnid: i for i, wnid in enumerate(wnids)}
    unknown = [w for w in wnids if w not in class_index]
    if unknown:
        raise PrepError(f"{src}: classes not in the class index: {', '.join(unknown[:10])}")
    classes = [""] * (max(class_index.values()) + 1)
    for wnid, idx in class_index.items():
        classes[idx] = wnid
    stems_unique = len({stem for _, _, stem in found}) == len(found)
    keys = [stem if stems_unique else f"{wnid}_{stem}" for _, wnid, stem in found]
    sources = [Source(path=rel, wnid=wnid, cls=class_index[wnid], key=key)
               for (rel, wnid, _), key in zip(found, unique_keys(keys, [rel for rel, _, _ in found]))]
    return sources, classes


def _visible_files(root: Path) -> list[Path]:
    """Every file under ROOT, in nested folders too, sorted; hidden files and folders left out."""
    return [f for f in sorted(root.rglob("*"))
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(root).parts)]


def _class_folder_files(src: Path) -> list[tuple[str, str, str]]:
    """(path under SRC, wnid, key stem) of SRC/<wnid>/**/<image>."""
    class_dirs = sorted(d for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise PrepError(f"{src}: no class folders (expected SRC/<wnid>/<image>, as ILSVRC2012's train set is laid "
                        "out; a flat folder such as its validation set needs --val-labels)")
    found = [(f"{d.name}/{f.relative_to(d).as_posix()}", d.name, _KEY_UNSAFE.sub("_", f.stem))
             for d in class_dirs for f in _visible_files(d)]
    if not found:
        raise PrepError(f"{src}: the class folders hold no files")
    empty = [d.name for d in class_dirs if not any(wnid == d.name for _, wnid, _ in found)]
    if empty:
        raise PrepError(f"{src}: class folder(s) with no files: {', '.join(empty[:10])}; a class without images "
                        "cannot be trained or evaluated: remove the folder or fill it")
    return found


def _labelled_files(src: Path, labels: dict[str, str]) -> list[tuple[str, str, str]]:
    """(path under SRC, wnid, key stem) of the files of a flat folder, each labelled by its stem."""
    files = _visible_files(src)
    if not files:
        raise PrepError(f"{src}: holds no files")
    unlabelled = [f.relative_to(src).as_posix() for f in files if f.stem not in labels]
    if unlabelled:
        raise PrepError(f"{src}: {len(unlabelled)} file(s) have no label in --val-labels (first: {unlabelled[0]}); "
                        "every image must be labelled, or moved out of the folder")
    return [(f.relative_to(src).as_posix(), labels[f.stem], _KEY_UNSAFE.sub("_", f.stem)) for f in files]


VAL_PREFIX = "ILSVRC2012_val_"


def read_val_labels(path: Path) -> dict[str, str]:
    """`--val-labels`: {image file stem: wnid} for a flat validation folder, from ILSVRC2012's devkit folder
    (data/meta.mat + data/ILSVRC2012_validation_ground_truth.txt: the N-th label is ILSVRC2012_val_<N>'s, as an
    ILSVRC2012_ID that meta.mat maps to a wnid), Kaggle's LOC_val_solution.csv (ImageId,PredictionString whose
    first word is the wnid), or a text file of `<image> <wnid>` lines."""
    path = Path(path)
    if path.is_dir():
        return _devkit_labels(path)
    if not path.is_file():
        raise PrepError(f"{path}: --val-labels not found (a devkit folder, LOC_val_solution.csv or a text file)")
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as e:
        raise PrepError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    labels = {}
    for n, line in enumerate(lines, 1):
        parts = line.replace(",", " ").split()
        if not parts or (n == 1 and parts[0] == "ImageId"):  # blank, or Kaggle's header
            continue
        if len(parts) < 2 or not _CLASS_NAME.fullmatch(parts[1]):
            raise PrepError(f"{path}: line {n} is not `<image> <wnid>`: {line[:80]!r}")
        labels[Path(parts[0]).stem] = parts[1]
    if not labels:
        raise PrepError(f"{path}: holds no `<image> <wnid>` line")
    return labels


_CLASS_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # a wnid (n01440764) or any class folder name


def _devkit_labels(devkit: Path) -> dict[str, str]:
    meta, truth = devkit / "data" / "meta.mat", devkit / "data" / "ILSVRC2012_validation_ground_truth.txt"
    for f in (meta, truth):
        if not f.is_file():
            raise PrepError(f"{devkit}: not an ILSVRC2012 devkit folder (no {f.relative_to(devkit)})")
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
        id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
        ids = [int(line) for line in truth.read_text().split()]
    except (MatReadError, ValueError, KeyError, TypeError, IndexError, OSError, UnicodeDecodeError) as e:
        raise PrepError(f"{devkit}: cannot read its labels ({type(e).__name__}: {e})") from None
    missing = sorted({i for i in ids if i not in id_to_wnid})
    if missing:
        raise PrepError(f"{truth}: ILSVRC2012_ID {missing[0]} is not a leaf class of {meta}")
    return {f"{VAL_PREFIX}{n:08d}": id_to_wnid[i] for n, i in enumerate(ids, 1)}


# WebDataset keys end at the first dot and name tar members: letters, digits, '_' and '-' only.
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def unique_keys(keys: list[str], paths: list[str]) -> list[str]:
    """Keys made unique within the split: `x.y.JPEG` and `x_y.JPEG` both sanitize to `x_y`, so every key
    that collides gets a suffix from its source path's hash (stable across re-runs)."""
    counts: dict[str, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    # os.fsencode: a file name that is not valid UTF-8 (kept as surrogates by Python) still hashes
    return [k if counts[k] == 1 else f"{k}-{hashlib.sha1(os.fsencode(p)).hexdigest()[:10]}"
            for k, p in zip(keys, paths)]


def plan_shards(sources: list[Source], shard_size: int, seed: int) -> list[list[Source]]:
    order = list(sources)
    random.Random(seed).shuffle(order)
    return [order[i : i + shard_size] for i in range(0, len(order), shard_size)]


def shard_fingerprint(members: list[Source], max_side: int | None) -> str:
    h = hashlib.sha256(json.dumps([max_side, [(s.path, s.cls, s.key) for s in members]]).encode())
    return h.hexdigest()


class _HashingFile:
    """File wrapper computing sha256 while writing, so a shard is never read back to hash it."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, b):
        self.sha.update(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


def _encode_image(data: bytes, max_side: int | None) -> tuple[bytes, int, int]:
    """Fully decode (catches truncated files); re-encode only when --max-side asks to shrink."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode not in FAITHFUL_MODES:  # e.g. 16-bit or float images: RGB would clip them to a constant
            raise ValueError(f"image mode {im.mode} has no faithful 8-bit RGB form")
        w, h = im.size
        if max_side and max(w, h) > max_side:
            scale = max_side / max(w, h)
            w, h = max(1, round(w * scale)), max(1, round(h * scale))
            out = io.BytesIO()
            im.convert("RGB").resize((w, h), Image.BICUBIC).save(out, "JPEG", quality=JPEG_QUALITY)
            data = out.getvalue()
    return data, w, h


def skip_reason(e: Exception) -> str:
    """Why an input file was skipped, in words: PIL names the in-memory buffer it read (`<_io.BytesIO object at
    0x...>`), which says nothing to the reader of _info.json."""
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "not an image PIL can read (cannot identify the image format)"
    return f"{type(e).__name__}: " + re.sub(r"\s*<[^<>]* object at 0x[0-9a-fA-F]+>", "", str(e))


def write_shard(src: str, out: str, shard_name: str, members: list[Source], max_side: int | None,
                fingerprint: str) -> dict:
    """Worker: write one shard atomically and its completion record. Returns the record."""
    out_dir = Path(out)
    final = out_dir / shard_name
    tmp = out_dir / f".{shard_name}.tmp{os.getpid()}"
    skipped = []
    try:
        record = _write_tar(src, tmp, members, max_side, skipped)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written shard never stays behind, whatever stopped it
        raise
    os.replace(tmp, final)
    record = {"filename": shard_name, **record, "bytes": final.stat().st_size, "skipped": skipped,
              "fingerprint": fingerprint}
    write_json_atomic(out_dir / ".prep" / f"{shard_name}.json", record)
    return record


def _write_tar(src: str, tmp: Path, members: list[Source], max_side: int | None, skipped: list) -> dict:
    import webdataset as wds

    count = 0
    with open(tmp, "wb") as raw:
        hashing = _HashingFile(raw)
        with wds.TarWriter(hashing, mtime=0, encoder=False) as tw:
            for s in members:
                try:
                    data = (Path(src) / s.path).read_bytes()
                    data, w, h = _encode_image(data, max_side)
                except Exception as e:  # undecodable, truncated or unreadable: skip, never abort
                    skipped.append({"path": s.path, "reason": skip_reason(e)})
                    continue
                meta = {"path": s.path, "wnid": s.wnid, "width": w, "height": h}
                tw.write({"__key__": s.key, "jpg": data, "cls": str(s.cls).encode(),
                          "json": json.dumps(meta).encode()})
                count += 1
        raw.flush()
        os.fsync(raw.fileno())
    return {"num_samples": count, "sha256": hashing.sha.hexdigest()}


def completed_record(out: Path, shard_name: str, fingerprint: str) -> dict | None:
    """The shard's record if the shard is complete and was built from the same plan."""
    rec_path, shard = out / ".prep" / f"{shard_name}.json", out / shard_name
    if not (rec_path.is_file() and shard.is_file()):
        return None
    try:
        rec = loads(rec_path.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("fingerprint") != fingerprint or rec.get("bytes") != shard.stat().st_size:
        return None
    return rec


class _HashingReader:
    """File wrapper computing sha256 while a shard is read, so verifying reads each shard once."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def read(self, n=-1):
        b = self.f.read(n)
        self.sha.update(b)
        return b


def digest_and_count(path_or_url: str) -> tuple[str, int]:
    """A shard's sha256 and its number of samples, in one streaming pass (local or remote)."""
    with open_file(path_or_url) as f:
        hashing = _HashingReader(f)
        with tarfile.open(fileobj=hashing, mode="r|") as tf:
            keys = {parts[0] for m in tf if m.isreg() and (parts := split_member(m.name))}
        while hashing.read(1 << 20):  # the end-of-archive blocks and padding count in the digest too
            pass
    return hashing.sha.hexdigest(), len(keys)


def prepare(src: Path, out: Path, split: str, name: str = "imagenet1k", shard_size: int = DEFAULT_SHARD_SIZE,
            workers: int | None = None, seed: int = 0, max_side: int | None = None,
            class_index: Path | None = None, val_labels: Path | None = None, progress: bool = True) -> dict:
    """Build (or finish building) the shards of one split; returns the split's `_info.json` entry. VAL_LABELS:
    SRC is a flat folder labelled by that file (read_val_labels), e.g. ILSVRC2012's validation set."""
    src, out = Path(src), Path(out)
    if shard_size < 1:
        raise PrepError(f"--shard-size must be >= 1, got {shard_size}")
    sources, classes = scan_sources(src, read_class_index(class_index) if class_index else None,
                                    read_val_labels(val_labels) if val_labels else None)
    info_path = out / INFO_FILE
    info = read_info(info_path, name)
    if info.get("classes") not in (None, classes):
        raise PrepError(f"{info_path}: its class list differs from {src}'s; use --class-index or a new --out")
    check_writable(out)
    try:
        return _prepare(src, out, split, name, shard_size, workers, seed, max_side, sources, classes, progress)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO):
            raise
        done = len(list((out / ".prep").glob(f"{name}-{split}-*.json")))
        raise PrepError(f"{out}: {e.strerror or e} while writing {e.filename or 'a shard'}; the {done} shard(s) "
                        "completed so far are kept: make room (or fix the directory) and re-run the same command "
                        "to resume") from None


def check_writable(out: Path) -> None:
    """--out must be a directory we can write, checked before any shard is made."""
    if out.exists() and not out.is_dir():
        raise PrepError(f"{out}: --out exists and is not a directory")
    if problem := writable_problem(out / ".prep"):
        raise PrepError(f"{out}: --out is not writable ({problem})")


def _prepare(src, out, split, name, shard_size, workers, seed, max_side, sources, classes, progress) -> dict:
    from tqdm import tqdm

    info_path = out / INFO_FILE
    # Leftovers of an interrupted run: never complete, never listed, so remove them.
    for stale in [*out.glob(f".{name}-{split}-*.tar.tmp*"), *(out / ".prep").glob(f".{name}-{split}-*.tmp*")]:
        stale.unlink(missing_ok=True)

    shards = plan_shards(sources, shard_size, seed)
    names = [f"{name}-{split}-{i:04d}.tar" for i in range(len(shards))]
    fingerprints = [shard_fingerprint(m, max_side) for m in shards]
    records: dict[str, dict] = {}
    todo = []
    for shard_name, members, fp in zip(names, shards, fingerprints):
        rec = completed_record(out, shard_name, fp)
        if rec is None:
            todo.append((shard_name, members, fp))
        else:
            records[shard_name] = rec
    bar = tqdm(total=len(sources), unit="img", desc=f"{split}: {len(todo)}/{len(shards)} shards to write",
               disable=not progress)
    bar.update(sum(len(m) for n, m, _ in zip(names, shards, fingerprints) if n in records))
    workers = workers or os.cpu_count() or 1
    if todo:
        with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
            futures = {pool.submit(write_shard, str(src), str(out), n, m, max_side, fp): len(m)
                       for n, m, fp in todo}
            try:
                for fut in as_completed(futures):
                    rec = fut.result()
                    records[rec["filename"]] = rec
                    bar.update(futures[fut])
            except BaseException:
                for fut in futures:  # the shards already written stay; the rest wait for the re-run
                    fut.cancel()
                raise
    bar.close()

    skipped = [s for n in names for s in records[n]["skipped"]]
    # A shard none of whose images could be read is an empty tar: removed with its record (a re-run tries its
    # images again), never listed; its files stay listed as skipped.
    for n in [n for n in names if not records[n]["num_samples"]]:
        (out / n).unlink(missing_ok=True)
        (out / ".prep" / f"{n}.json").unlink(missing_ok=True)
        del records[n]
    names = [n for n in names if n in records]
    ordered = [records[n] for n in names]
    if not ordered:
        first = f" (first: {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""
        raise PrepError(f"{src}: no readable image among {len(skipped)} file(s){first}; nothing was listed in "
                        f"{info_path} and no shard was left behind")
    entry = {
        "name": split,
        "num_samples": sum(r["num_samples"] for r in ordered),
        "filenames": names,
        "shard_lengths": [r["num_samples"] for r in ordered],
        "sha256": [r["sha256"] for r in ordered],
        "skipped": skipped,
        "seed": seed,
        "max_side": max_side,
    }
    # Re-read just before writing: the other split may have been prepared meanwhile.
    info = read_info(info_path, name)
    info.update(name=name, num_classes=len(classes), classes=classes)
    info["splits"][split] = entry
    write_json_atomic(info_path, info)
    return entry


def verify(out: str | Path, split: str) -> list[str]:
    """Check every shard of a split against `_info.json` (sample count and sha256), locally or at a remote
    location (vitbench.data.remote); returns a list of problems (empty: all good)."""
    location = parse(str(out))
    info_path = location.join(INFO_FILE)
    try:  # the readers' own parser: what --verify accepts, training accepts
        info = parse_info(shardformat.read_info(location), info_path)
        names, lengths, _ = split_entry(info, info_path, split)
        rows = list(zip(names, lengths, split_digests(info, info_path, split)))
    except DataError as e:
        return [f"{e}; re-run the prep to rewrite it"]
    problems = []
    for fname, length, digest in rows:
        try:
            sha, count = digest_and_count(location.join(fname))
        except DataError as e:
            problems.append(str(e))
            continue
        except FileNotFoundError:
            problems.append(f"{location.join(fname)}: missing")
            continue
        except (OSError, EOFError, tarfile.TarError) as e:
            problems.append(f"{location.join(fname)}: unreadable ({type(e).__name__}: {e})")
            continue
        if sha != digest:
            problems.append(f"{location.join(fname)}: sha256 differs from the one recorded at write time")
        elif count != length:
            problems.append(f"{location.join(fname)}: sample count differs from {length}")
    return problems
