#!/usr/bin/env python
"""Convert an ImageFolder tree (ILSVRC2012 layout) into WebDataset tar shards.

    python prep_shards.py --src /data/imagenet/train --out /data/imagenet-wds --split train
    python prep_shards.py --src /data/imagenet/val   --out /data/imagenet-wds --split validation
    python prep_shards.py --out /data/imagenet-wds --split train --verify
    python prep_shards.py --out s3://bucket/imagenet-wds --split train --verify   # also https, gs, hf
    python prep_shards.py --out /data/imagenet-wds --split train --dali-index

Re-running after an interruption keeps completed shards and rebuilds only the rest.
"""
import argparse
import sys
from pathlib import Path

from vitbench.data.prep import DEFAULT_SHARD_SIZE, prepare, verify
from vitbench.data.remote import LocationError, parse
from vitbench.data.shardformat import load_split
from vitbench.errors import exit_status


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def main(argv=None) -> int:
    # File names need not be valid UTF-8 nor printable in the terminal's encoding (LC_ALL=C): never crash
    # on printing one, after the shards are written.
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(errors="backslashreplace")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, help="ImageFolder root: SRC/<wnid>/<image>")
    p.add_argument("--out", required=True,
                   help="output directory for shards and _info.json (--verify: also https://, s3://, gs://, hf://)")
    p.add_argument("--split", required=True, choices=["train", "validation"])
    p.add_argument("--name", default="imagenet1k", help="shard name prefix (default: %(default)s)")
    p.add_argument("--shard-size", type=positive, default=DEFAULT_SHARD_SIZE,
                   help="samples per shard (default %(default)s: 1024 shards for ImageNet train)")
    p.add_argument("--workers", type=positive, default=None, help="parallel processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle (default: %(default)s)")
    p.add_argument("--max-side", type=positive, default=None,
                   help="re-encode (JPEG q90) images whose longer side exceeds this; others stay byte-identical")
    p.add_argument("--class-index", type=Path, default=None,
                   help="fixed class mapping: JSON {wnid: index} or one wnid per line (default: sorted folders)")
    p.add_argument("--val-labels", type=Path, default=None,
                   help="SRC is a flat folder (ILSVRC2012's validation set as distributed): its labels, from the "
                        "devkit folder (ILSVRC2012_devkit_t12, read with its data/meta.mat), Kaggle's "
                        "LOC_val_solution.csv, or a text file of '<image> <wnid>' lines; nothing is moved")
    p.add_argument("--verify", action="store_true",
                   help="check existing shards against _info.json (counts, sha256) instead of writing")
    p.add_argument("--dali-index", action="store_true",
                   help="write NVIDIA DALI's tar index (<shard>.idx, beside each shard) for the split's shards, so "
                        "--loader dali starts without scanning every tar; timm and our reader ignore them")
    args = p.parse_args(argv)
    try:
        where = parse(args.out, flag="--out")
    except LocationError as e:
        p.error(str(e))
    if where.remote and not args.verify:
        p.error(f"--out {args.out}: shards are written and indexed on a local disk; --verify checks them anywhere")
    if not args.verify:
        args.out = Path(args.out)

    if args.dali_index:
        return exit_status(write_dali_index, args.out, args.split)
    if args.verify:
        problems = verify(args.out, args.split)
        for line in problems:
            print(f"FAIL {line}", file=sys.stderr)
        print(f"verify {args.split}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        return 1 if problems else 0
    if args.src is None:
        p.error("--src is required unless --verify or --dali-index")
    return exit_status(prepare_and_say, args)


def write_dali_index(out: Path, split: str) -> None:
    from vitbench.data.dali_loader import write_index  # imports torch: only for this option

    shards = load_split(out, split)
    for url in shards.urls:
        write_index(url)
    print(f"{split}: DALI index written for {len(shards.urls)} shards in {out}")


def prepare_and_say(args) -> None:
    entry = prepare(args.src, args.out, args.split, name=args.name, shard_size=args.shard_size,
                    workers=args.workers, seed=args.seed, max_side=args.max_side,
                    class_index=args.class_index, val_labels=args.val_labels)
    print(f"{args.split}: {entry['num_samples']} samples in {len(entry['filenames'])} shards -> {args.out}")
    if entry["skipped"]:
        print(f"skipped {len(entry['skipped'])} unreadable file(s) (listed in {args.out}/_info.json):")
        for s in entry["skipped"]:
            print(f"  {s['path']}: {s['reason']}")


if __name__ == "__main__":
    sys.exit(main())
