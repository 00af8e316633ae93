"""Embedded demo dataset: a small ImageNet-like ImageFolder made from the photographs that
scikit-image ships inside its package (nothing is downloaded), then sharded by the same
`prep_shards` path as ImageNet.

Each photo is a class; each sample is a random crop / rescale / flip / small colour change of it,
saved as JPEG (quality 90) with sides of roughly 300-500 px. Train and validation are disjoint
random draws (different seeds).

    python -m vitbench.data.demo --out shards/demo
"""

from __future__ import annotations

import argparse
import fcntl
import json
import random
import shutil
from pathlib import Path

from vitbench.data.prep import PrepError, prepare
from vitbench.data.shardformat import INFO_FILE
from vitbench.errors import exit_status
from vitbench.files import write_json_atomic

# Seven colour photographs and three grayscale ones (rendered as RGB): ten classes.
PHOTOS = ["astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket",
          "camera", "coins", "moon"]
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shards" / "demo"  # the repo's shards/, git-ignored


def _photo(name: str):
    import numpy as np
    import skimage.data
    from PIL import Image

    arr = getattr(skimage.data, name)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return Image.fromarray(arr[..., :3])


def _variant(photo, rng: random.Random):
    from PIL import Image, ImageEnhance

    w, h = photo.size
    frac = rng.uniform(0.35, 1.0)
    aspect = rng.uniform(3 / 4, 4 / 3)
    cw = min(w, max(16, round(w * frac * aspect ** 0.5)))
    ch = min(h, max(16, round(h * frac / aspect ** 0.5)))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = photo.crop((x, y, x + cw, y + ch))
    longer = rng.randint(300, 500)
    scale = longer / max(cw, ch)
    img = img.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(rng.uniform(0.85, 1.15))
    return img


def make_imagefolder(root: Path, train_per_class: int, val_per_class: int, seed: int = 0) -> None:
    """Write ROOT/{train,validation}/<class>/<class>_<i>.JPEG."""
    for split, per_class, split_seed in (("train", train_per_class, seed), ("validation", val_per_class, seed + 1)):
        for ci, name in enumerate(PHOTOS):
            photo = _photo(name)
            rng = random.Random(split_seed * 1000 + ci)
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                _variant(photo, rng).save(d / f"{name}_{i:05d}.JPEG", "JPEG", quality=90)


def build(out: Path = DEFAULT_DIR, train_per_class: int = 100, val_per_class: int = 20, shard_size: int = 64,
          seed: int = 0, workers: int | None = None, progress: bool = True) -> Path:
    """Make the demo shards in OUT unless they are already there with the same parameters."""
    out = Path(out)
    params = {"photos": PHOTOS, "train_per_class": train_per_class, "val_per_class": val_per_class,
              "shard_size": shard_size, "seed": seed}
    marker = out / "demo.json"
    if marker.is_file() and (out / INFO_FILE).is_file() and json.loads(marker.read_text()) == params:
        return out
    if out.exists():
        if not out.is_dir() or (not marker.is_file() and any(out.iterdir())):
            raise PrepError(f"{out}: exists and is not a demo shard directory (no demo.json); refusing to replace "
                            "it: pick another --out")
        shutil.rmtree(out)  # an earlier demo build (its marker is there) with other parameters, or empty
    out.mkdir(parents=True)
    write_json_atomic(marker, {**params, "complete": False})  # ours from now on, also if interrupted
    src = out / "src"
    make_imagefolder(src, train_per_class, val_per_class, seed)
    for split in ("train", "validation"):
        prepare(src / split, out, split, name="demo", shard_size=shard_size, workers=workers, seed=seed,
                progress=progress)
    write_json_atomic(marker, params)
    return out


def build_shared(out: Path = DEFAULT_DIR) -> Path:
    """build() for every process of a launch: the first builds, the others wait on the lock and find it done."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return build(out, progress=False)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_DIR)
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--val-per-class", type=int, default=20)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    raise SystemExit(exit_status(build_and_say, p.parse_args(argv)))


def build_and_say(args) -> None:
    out = build(args.out, args.train_per_class, args.val_per_class, args.shard_size, args.seed)
    info = json.loads((out / INFO_FILE).read_text())
    for split, e in info["splits"].items():
        print(f"demo {split}: {e['num_samples']} images, {len(e['filenames'])} shards in {out}")


if __name__ == "__main__":
    main()
