#!/usr/bin/env python
"""Generate the seed's table (and charts, and a W&B workspace) from run files.

    python report.py runs/*/                        # markdown table, Chinese headers as the seed
    python report.py runs/*/ --lang en --plots out/  # English headers, PNG charts
    python report.py runs/*/ --out study/            # study/report.md: table, scaling, precision x ZeRO,
                                                     # step timelines, environments, and their PNGs
    python report.py runs/*/ --vendor-readme        # the seed's whole README (硬件环境, 软件环境, 通用指标,
                                                     # 性能指标) for one vendor profile's runs
    python report.py --wandb-workspace ENTITY/PROJECT  # save the standard W&B dashboard (online)
    python report.py compare BASE CANDIDATE...      # what differs, ratios with 95% intervals and a verdict,
                                                     # convergence parity (--fail-if-slower PCT: a CI gate)
"""
import argparse
import json
import sys
from pathlib import Path

from vitbench import reporting, seed_readme, study
from vitbench.errors import exit_status


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"]:
        return compare_main(argv[1:])
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
    return exit_status(publish, args)


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


def compare_main(argv) -> int:
    from vitbench import compare, stats

    p = argparse.ArgumentParser(prog="report.py compare", description=compare.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="the base run (a run folder or its results.json)")
    p.add_argument("candidates", nargs="+", help="runs compared with the base; repeats among them are pooled")
    p.add_argument("--base-repeat", action="append", default=[], metavar="RUN",
                   help="a repeat of the base (same Plan but run name, seed, output folder), pooled with it")
    p.add_argument("--out", type=Path, default=None, help="write compare.md, step_times.png and curves.png here")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON instead of markdown")
    p.add_argument("--fail-if-slower", type=float, default=None, metavar="PCT",
                   help="exit 1 when a candidate's p_core or p_train steady is slower than the base by more than "
                        "PCT%% beyond noise (a regression gate)")
    p.add_argument("--launch-noise", type=float, default=100 * stats.DEFAULT_LAUNCH_NOISE, metavar="PCT",
                   help="launch-to-launch spread assumed where a side has fewer than 3 runs (default: %(default)s)")
    p.add_argument("--parity-threshold", type=float, default=100 * compare.PARITY_THRESHOLD, metavar="PCT",
                   help="the largest mean relative error of the training loss that still trains like the base "
                        "(default: %(default)s, FlagPerf's)")
    return exit_status(compare_runs, p.parse_args(argv))


def compare_runs(args) -> int:
    from vitbench import compare

    base, groups = compare.sides([args.base, *args.base_repeat], args.candidates)
    results = [compare.compare(base, g, args.launch_noise / 100, args.parity_threshold / 100) for g in groups]
    text = "".join(compare.markdown(r) + "\n" for r in results)
    sys.stdout.write(json.dumps(results, indent=1) + "\n" if args.json else text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        charts = compare.charts(base, groups, args.out)
        (args.out / "compare.md").write_text(text + "".join(f"![{c.stem}]({c.name})\n\n" for c in charts))
        print(f"wrote {args.out / 'compare.md'}", file=sys.stderr)
    if args.fail_if_slower is not None:
        slow = [f"{r['candidate']}: {x}" for r in results for x in compare.slower_beyond(r, args.fail_if_slower)]
        for line in slow:
            print(f"slower than {results[0]['base']} by more than {args.fail_if_slower:g}% beyond noise: {line}",
                  file=sys.stderr)
        return 1 if slow else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
