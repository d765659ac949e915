"""The `lvita` command line: thin wrappers over lvita_data (and later lvita_model).

    lvita demo-data DIR                     write the deterministic demo corpus
    lvita plan MANIFEST [--out PLAN.json]   exact lengths per selected sample, rejects, a report
    lvita build MANIFEST --out DIR          packed WebDataset shards (resumable)
    lvita stats DIR [--json] [--html FILE]  packing quality report of a build
    lvita verify DIR                        checksums, per-sample invariants, accounting
    lvita generate MODEL --prompt TEXT      generated text, KV cache (see pipelines.generate)
    lvita train CONFIG [--no-resume]        train a stage (torchrun for DP x CP; pipelines.train)

Exit codes: 0 ok, 2 bad manifest or arguments, 3 missing or unreadable inputs, 4 reject rate
over the manifest's threshold, 5 build
output directory problems, 6 verify found problems.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lvita_data.errors import ManifestError, RejectRateExceeded
from pipelines.generate import add_parser as add_generate_parser

EXIT_MANIFEST, EXIT_MISSING, EXIT_REJECTS, EXIT_BUILD = 2, 3, 4, 5


def _write_json_atomic(path: Path, payload: dict) -> None:
    from lvita_data.shards.writer import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(str(path), json.dumps(payload, ensure_ascii=False, separators=(",", ":")))


def _cmd_plan(args: argparse.Namespace) -> int:
    from lvita_data.build.plan import format_report, plan_stage
    from lvita_data.errors import MissingInputs
    from lvita_data.manifest import load_manifest

    manifest = load_manifest(args.manifest)
    started = time.perf_counter()
    try:
        plan = plan_stage(
            manifest,
            workers=args.workers,
            verify_media=args.verify_media,
            allow_missing=args.allow_missing,
            progress=not args.quiet,
        )
    except MissingInputs as error:
        print(f"lvita plan: {error}", file=sys.stderr)
        return EXIT_MISSING
    seconds = time.perf_counter() - started
    print(format_report(plan))
    rate = plan.num_samples / seconds if seconds > 0 else float("inf")
    print(f"planned in {seconds:.1f} s ({rate:,.0f} samples/s, {args.workers} worker(s))")
    if args.out:
        _write_json_atomic(Path(args.out), plan.to_json())
        print(f"wrote {args.out}")
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from lvita_data.build.run import build_stage
    from lvita_data.errors import BuildError, MissingInputs

    started = time.perf_counter()
    try:
        index = build_stage(
            args.manifest,
            args.out,
            workers=args.workers,
            executor=args.executor,
            resume=args.resume,
            progress=not args.quiet,
        )
    except MissingInputs as error:
        print(f"lvita build: {error}", file=sys.stderr)
        return EXIT_MISSING
    except BuildError as error:
        print(f"lvita build: {error}", file=sys.stderr)
        return EXIT_BUILD
    shards = index["shards"]
    packs = sum(s["samples"] for s in shards)
    tokens = sum(s["tokens"] for s in shards)
    fill = tokens / (packs * index["max_seq_len"]) if packs else 0.0
    print(
        f"{args.out}: {len(shards)} shard(s), {packs} packed sequence(s), {tokens:,} tokens, "
        f"fill {fill:.2%}, in {time.perf_counter() - started:.1f} s"
    )
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from lvita_data.stats.compute import main_stats

    return main_stats(args.dir, json_out=args.json, html=args.html)


def _cmd_verify(args: argparse.Namespace) -> int:
    from lvita_data.verify.verify import main_verify

    return main_verify(
        args.dir, json_out=args.json, workers=args.workers, decode_tiles=not args.no_decode
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from lvita_data.errors import LoaderError
    from lvita_model.config import ConfigError
    from lvita_model.weights import WeightsError
    from pipelines.train.checkpoint import CheckpointError
    from pipelines.train.config import load_train_config
    from pipelines.train.loop import train

    config = load_train_config(args.config)
    try:
        train(config, resume=not args.no_resume)
    except (LoaderError, CheckpointError, ConfigError, WeightsError) as error:
        print(f"lvita train: {error}", file=sys.stderr)
        return EXIT_MISSING
    return 0


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from lvita_data.demo import make_demo_corpus

    summary = make_demo_corpus(args.dir, seed=args.seed)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lvita", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    plan = commands.add_parser("plan", help="exact token lengths of a stage, before decoding")
    plan.add_argument("manifest", help="stage manifest YAML")
    plan.add_argument("--out", help="write the plan JSON (lengths per selected sample, rejects)")
    plan.add_argument("--workers", type=int, default=1, help="parallel processes over files")
    plan.add_argument(
        "--verify-media", action="store_true", help="also decode images (catches truncated files)"
    )
    plan.add_argument(
        "--allow-missing", action="store_true", help="plan even if dataset files are missing"
    )
    plan.add_argument("--quiet", action="store_true", help="no progress bar")
    plan.set_defaults(run=_cmd_plan)

    build = commands.add_parser("build", help="packed WebDataset shards of a stage")
    build.add_argument("manifest", help="stage manifest YAML")
    build.add_argument("--out", required=True, help="output directory")
    build.add_argument("--workers", type=int, default=1, help="parallel processes (or Ray CPUs)")
    build.add_argument("--executor", choices=("local", "ray"), default="local")
    build.add_argument("--resume", action="store_true", help="finish an interrupted build")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.set_defaults(run=_cmd_build)

    stats = commands.add_parser("stats", help="fill, padding, lengths, shares, rejects of a build")
    stats.add_argument("dir", help="build output directory")
    stats.add_argument("--json", action="store_true", help="print JSON instead of tables")
    stats.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report")
    stats.set_defaults(run=_cmd_stats)

    verify = commands.add_parser("verify", help="checksums, per-sample invariants, accounting")
    verify.add_argument("dir", help="build output directory")
    verify.add_argument("--json", action="store_true", help="machine-readable report")
    verify.add_argument("--workers", type=int, default=1, help="parallel processes over shards")
    verify.add_argument(
        "--no-decode", action="store_true", help="check PNG CRCs and headers, do not decode tiles"
    )
    verify.set_defaults(run=_cmd_verify)

    demo = commands.add_parser("demo-data", help="write the deterministic demo corpus")
    demo.add_argument("dir")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_cmd_demo_data)
    add_generate_parser(commands)

    train = commands.add_parser("train", help="train a stage on its packed shards (DP x CP)")
    train.add_argument("config", help="training config YAML (configs/train/*.yaml)")
    train.add_argument(
        "--no-resume",
        action="store_true",
        help="do not continue from the latest checkpoint (refused if output.dir has one)",
    )
    train.set_defaults(run=_cmd_train)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.run(args)
    except ManifestError as error:
        print(f"lvita: {error}", file=sys.stderr)
        code = EXIT_MANIFEST
    except RejectRateExceeded as error:
        print(f"lvita: {error}", file=sys.stderr)
        code = EXIT_REJECTS
    raise SystemExit(code)


if __name__ == "__main__":
    main()
