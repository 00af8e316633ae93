"""The shard format every reader and writer here shares (timm's `wds/` layout, as timm/imagenet-1k-wds):

  DIR/_info.json   {"name", "num_classes", "classes", "splits": {SPLIT: {"filenames", "shard_lengths", ...}}}
  DIR/<shard>.tar  samples `<key>.jpg` + `<key>.cls` (the class index as text), one key after another

What a split is (ShardSet), how `_info.json` is checked (it may lie: nothing it says is believed unchecked),
what a tar member name and a label mean. prep writes it, the WebDataset and DALI readers and validation read it.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from vitbench.data.remote import Location, open_file, parse
from vitbench.errors import UserError
from vitbench.files import loads

INFO_FILE = "_info.json"
TAR_BLOCK = 512
# A head of more classes than this is no ImageNet variant (21k has 21,841): a typo that would be found only
# when the model's last layer exhausts memory.
MAX_CLASSES = 1_000_000

# A sample member is `<key>.<ext>` with no directory part; anything else in a tar is foreign.
_MEMBER = re.compile(r"^([^./\\]+)\.([^/\\]+)$")


class DataError(UserError):
    pass


def split_member(name: str) -> tuple[str, str] | None:
    """A tar member name -> (sample key, extension): the key ends at the first dot, as webdataset and timm
    read it. None for a name that is no sample file (a directory part, no extension, a leading dot)."""
    match = _MEMBER.match(name)
    return (match[1], match[2]) if match else None


def parse_label(raw: bytes, num_classes: int) -> int:
    """A sample's `.cls` bytes -> its class index; ValueError for anything else (every reader drops those)."""
    text = raw.decode("ascii").strip()
    if not text.isdigit() or int(text) >= num_classes:
        raise ValueError(f"label {text[:20]!r} is not a class index in [0, {num_classes})")
    return int(text)


def check_shard_name(name, info_path) -> None:
    """A shard listed in `_info.json` must be a plain relative file name under the data directory."""
    if not isinstance(name, str) or not name:
        raise DataError(f"{info_path}: shard name {name!r} is not a file name")
    parts = Path(name).parts
    if (Path(name).is_absolute() or name.startswith("~") or "\\" in name or ".." in parts
            or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", name) or any(c in name for c in "?#%\0\n")):
        raise DataError(f"{info_path}: shard name {name!r} is not a plain relative file name under the data "
                        "directory (no URL scheme, absolute path, '..', '?', '#' or '%'); fix the file or re-make "
                        "the shards")


def tar_header_problem(block: bytes) -> str | None:
    """Why a file whose first 512 bytes are BLOCK is not a tar, or None (cheap enough for 1,024 shards)."""
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
        return None
    except tarfile.HeaderError as e:
        return f"not a tar file ({e})" if block else "empty file"


@dataclass
class ShardSet:
    """One split as described by `_info.json`: shard locations, their sample counts, the number of classes."""

    split: str
    urls: list[str]
    lengths: list[int]
    num_classes: int
    info_sha256: str = ""  # of the `_info.json` it came from: the data's identity for resume checks

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)


def parse_info(text: str, info_path) -> dict:
    try:
        info = loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{info_path}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or not isinstance(info.get("splits"), dict):
        raise DataError(f"{info_path}: not an _info.json object with a 'splits' mapping")
    return info


def split_entry(info: dict, info_path, split: str) -> tuple[list[str], list[int], int]:
    """SPLIT's shard names, sample counts and the class count, each checked: a lying `_info.json` is refused
    here, naming the file, before any shard is read."""
    try:
        entry = info["splits"][split]
        names, lengths = list(entry["filenames"]), list(entry["shard_lengths"])
    except (KeyError, TypeError) as e:
        raise DataError(f"{info_path}: no usable '{split}' split ({type(e).__name__}: {e})") from None
    num_classes = info.get("num_classes")
    if num_classes is None:
        num_classes = len(info.get("classes") or []) or 1000
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= MAX_CLASSES:
        raise DataError(f"{info_path}: num_classes {num_classes!r} is not an integer in [1, {MAX_CLASSES:,}]")
    if len(names) != len(lengths) or not names:
        raise DataError(f"{info_path}: split '{split}' lists {len(names)} shards but {len(lengths)} shard_lengths")
    bad = [n for n in lengths if isinstance(n, bool) or not isinstance(n, int) or n < 0]
    if bad:  # JSON lets a file say Infinity, NaN, -3 or 2.5 samples
        raise DataError(f"{info_path}: split '{split}' has shard length {bad[0]!r}; lengths are integers >= 0")
    twice = sorted({n for n in names if names.count(n) > 1}, key=str)
    if twice:  # a shard read twice a pass would be evaluated twice
        raise DataError(f"{info_path}: split '{split}' lists shard {twice[0]!r} more than once")
    for name in names:
        check_shard_name(name, info_path)
    return names, lengths, num_classes


def split_digests(info: dict, info_path, split: str) -> list[str]:
    """SPLIT's recorded sha256 per shard (prep writes them; --verify checks the shards against them)."""
    names, _, _ = split_entry(info, info_path, split)
    digests = info["splits"][split].get("sha256")
    if not isinstance(digests, list) or len(digests) != len(names) or not all(isinstance(d, str) for d in digests):
        raise DataError(f"{info_path}: split '{split}' has no sha256 string for each of its {len(names)} shards")
    return digests


def read_info(location: Location) -> bytes:
    """The bytes of LOCATION's `_info.json` (one request when remote)."""
    info_path = location.join(INFO_FILE)
    try:
        with open_file(info_path) as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{info_path}: not found; make shards with `python prep_shards.py` or point "
                        "--data-dir at a directory holding _info.json and its tar shards") from None
    except OSError as e:
        raise DataError(f"{info_path}: unreadable ({e.strerror or e})") from None


def load_split(data_dir: str | Path | Location, split: str, info: bytes | None = None) -> ShardSet:
    """SPLIT of the shards at DATA_DIR (a local directory or a remote location, vitbench.data.remote); INFO: its
    `_info.json` when already read. Locally every listed shard must be there and a tar; remotely only the first
    one's header is read (one request, not one per shard from every rank), and a shard that cannot be read
    later counts as lost samples."""
    location = data_dir if isinstance(data_dir, Location) else parse(str(data_dir))
    info_path, raw = location.join(INFO_FILE), info if info is not None else read_info(location)
    names, lengths, num_classes = split_entry(parse_info(raw, info_path), info_path, split)
    urls = [location.join(f) for f in names]
    if not location.remote:
        missing = [u for u in urls if not Path(u).is_file()]  # is_file follows a user's symlink to another disk
        if missing:
            raise DataError(f"{info_path}: split '{split}' lists shards that are not there: "
                            f"{', '.join(missing[:3])}")
    broken = [(u, why) for u in (urls[:1] if location.remote else urls) if (why := _header_problem(u))]
    if broken:
        raise DataError(f"{info_path}: split '{split}' has {len(broken)} unreadable shard(s): "
                        + "; ".join(f"{u}: {why}" for u, why in broken[:3])
                        + "; re-make them with prep_shards.py (--verify lists every problem)")
    return ShardSet(split, urls, lengths, num_classes, hashlib.sha256(raw).hexdigest())


def _header_problem(path: str) -> str | None:
    try:
        with open_file(path) as f:
            return tar_header_problem(f.read(TAR_BLOCK))
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
