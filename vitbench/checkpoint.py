"""Complete-or-ignored checkpoints on top of accelerate's state saving (DeepSpeed checkpoints inside).

Every rank saves into `step_NNNNNNNN.tmp/`; after all ranks are done the main process writes a
`COMPLETE` marker and renames the folder to `step_NNNNNNNN/` (one atomic rename). A run killed while
saving leaves only a `.tmp` folder, which resume ignores and the next save removes.
Multi-node runs need the output directory on a shared filesystem, as DeepSpeed's ZeRO checkpoints do.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

MARKER = "COMPLETE"
_NAME = re.compile(r"^step_(\d{8})$")


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under ROOT, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _NAME.match(d.name)
        if m and (d / MARKER).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def resolve_resume(resume: str, root: Path) -> Path | None:
    """`--resume auto`: newest complete checkpoint under ROOT, or None; `--resume PATH`: that one."""
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(root)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {MARKER} marker)")
    return path


def save(accelerator, root: Path, step: int, keep: int, meta: dict) -> Path:
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f"{final.name}.tmp"
    if accelerator.is_main_process:
        for stale in root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / MARKER, "w") as f:
            json.dump({"step": step, **meta}, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
