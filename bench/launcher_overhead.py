#!/usr/bin/env python
"""What the launcher costs around the ranks: `accelerate launch` against accelerate's own `accelerate-launch`
entry point (the same accelerate.commands.launch:main without the dispatcher, which first imports every
subcommand; estimate-memory imports timm and transformers), side by side in one run.

Each trial launches 2 ranks of a script that does nothing, on the CPU config, alternating the two commands;
the figure is the launch's wall time, i.e. the launcher's start, torchrun's rendezvous and its exit.

    python bench/launcher_overhead.py [--trials 5]

The last line is JSON.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COMMANDS = {"accelerate launch": [str(BIN / "accelerate"), "launch"],
            "accelerate-launch": [str(BIN / "accelerate-launch")]}


def launch_seconds(command: list[str], script: Path) -> float:
    start = time.perf_counter()
    subprocess.run([*command, "--config_file", str(REPO / "accelerate_configs/cpu_1x2.yaml"), "--num_processes",
                    "2", str(script)], check=True, capture_output=True)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=5, help="launches per command, alternating")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "nothing.py"
        script.write_text("")
        times = {name: [] for name in COMMANDS}
        for _ in range(args.trials):
            for name, command in COMMANDS.items():
                times[name].append(launch_seconds(command, script))
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:18s} median {med[name]:.2f} s  ({', '.join(f'{x:.2f}' for x in t)})")
    print(f"saved per launch: {med['accelerate launch'] - med['accelerate-launch']:.2f} s")
    print(json.dumps({"trials": args.trials, "launch_s": times, "median_s": med}))


if __name__ == "__main__":
    main()
