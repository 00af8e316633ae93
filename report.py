#!/usr/bin/env python
"""Generate the seed's table (and charts, and a W&B workspace) from run files.

    python report.py runs/*/                        # markdown table, Chinese headers as the seed
    python report.py runs/*/ --lang en --plots out/  # English headers, PNG charts
    python report.py runs/*/ --out study/            # study/report.md: table, scaling, precision x ZeRO,
                                                     # step timelines, environments, and their PNGs
    python report.py runs/*/ --vendor-readme        # the seed's whole README (硬件环境, 软件环境, 通用指标,
                                                     # 性能指标) for one vendor profile's runs
    python report.py --wandb-workspace ENTITY/PROJECT  # save the standard W&B dashboard (online)
"""
import argparse
import sys
from pathlib import Path

from vitbench import reporting, seed_readme, study
from vitbench.errors import EXIT_USER_ERROR, UserError, one_line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", help="run directories or results.json files")
    p.add_argument("--lang", choices=["zh", "en"], default="zh")
    p.add_argument("--plots", type=Path, default=None, help="write throughput.png and breakdown.png here")
    p.add_argument("--out", type=Path, default=None,
                   help="write report.md and its PNGs here (from results.json and metrics.jsonl)")
    p.add_argument("--vendor-readme", action="store_true",
                   help="print the seed's whole README for these runs of one --vendor profile instead of the table")
    p.add_argument("--wandb-workspace", metavar="ENTITY/PROJECT", default=None,
                   help="save a W&B workspace with the standard panels")
    args = p.parse_args(argv)
    if not args.runs and not args.wandb_workspace:
        p.error("give run directories and/or --wandb-workspace")
    try:
        publish(args)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def publish(args) -> None:
    if args.runs:
        problems = []  # a failed or unfinished run among many is a footnote, not the end of the report
        results = reporting.load_results(args.runs, problems)
        if not results:
            raise reporting.ResultsError(problems[0] if len(problems) == 1 else
                                         f"none of the {len(problems)} runs has a readable results.json: {problems[0]}")
        sys.stdout.write(seed_readme.write(results, args.lang) if args.vendor_readme else
                         reporting.markdown_table(results, args.lang, problems))
        if args.plots:
            for path in reporting.plots(results, args.plots):
                print(f"wrote {path}")
        if args.out:
            run_dirs = [Path(r) if Path(r).is_dir() else Path(r).parent for r in args.runs
                        if not any(problem.startswith(str(Path(r))) for problem in problems)]
            print(f"wrote {study.write_report(results, run_dirs, args.out)}")
    if args.wandb_workspace:
        workspace = reporting.build_workspace(args.wandb_workspace)
        try:
            workspace = workspace.save()
        except Exception as e:  # no login, no network, a refused entity: W&B's own exception types vary
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise reporting.ResultsError(f"--wandb-workspace {args.wandb_workspace}: W&B did not save it "
                                         f"({type(e).__name__}: {first}); `wandb login` first, or check the "
                                         "entity and project") from None
        print(f"saved W&B workspace: {workspace.url}")


if __name__ == "__main__":
    sys.exit(main())
