"""The `lvita` command line over lvita_data, lvita_model and the training pipeline.

    lvita demo-data DIR                     write the deterministic demo corpus
    lvita plan MANIFEST [--out PLAN.json]   exact lengths per selected sample, rejects, a report
    lvita build MANIFEST --out DIR          packed WebDataset shards (resumable; --plan PLAN.json
                                            reuses a plan of the same manifest and data)
    lvita stats DIR [--json] [--html FILE]  packing quality report of a build
    lvita verify DIR                        checksums, per-sample invariants, accounting
    lvita show DIR [--pack K | --key KEY]   one packed sequence as the model sees it
    lvita generate MODEL --prompt TEXT      generated text, KV cache (see pipelines.generate)
    lvita train CONFIG [--nproc-per-node N] train a stage (DP x CP over N ranks; pipelines.train)

Exit codes: 0 ok, 2 bad manifest or arguments, 3 missing or unreadable inputs, 4 reject rate
over the manifest's threshold, 5 build output directory problems, 6 verify found problems, 130
interrupted (Ctrl-C), 143 terminated (SIGTERM). An interrupt prints one line with the command
that resumes; finished shards and checkpoints are kept (every file is written atomically). Output
cut short by a closed pipe (``lvita plan | head``) ends quietly.

The library raises; this module alone prints and decides the exit code: `EXIT_CODES` maps each
error class to its code (the most specific class of an error wins), `run` reports an error as
one line on stderr, ``lvita: ...`` for a manifest, a training config or a reject rate, else
``lvita COMMAND: ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lvita_data import __version__
from lvita_data.errors import (
    BuildError,
    EnergonMetadataError,
    LoaderError,
    ManifestError,
    MissingInputs,
    PoolError,
    RejectRateExceeded,
    ShardFormatError,
    ShowError,
    StatsError,
    WorkerLost,
)
from lvita_model.errors import ConfigError, WeightsError
from pipelines.errors import (
    CheckpointError,
    GenerateError,
    GenerateInputError,
    TrainConfigError,
)

if TYPE_CHECKING:
    from pipelines.train.config import TrainConfig

EXIT_OK = 0
EXIT_CODES: dict[type[Exception], int] = {
    # 1: a worker process died (killed, out of memory): finished work is kept
    WorkerLost: 1,
    # 2: a bad manifest, config or argument
    ManifestError: 2,
    TrainConfigError: 2,
    GenerateError: 2,
    ShowError: 2,
    PoolError: 2,  # an executor that cannot run here (Ray not installed)
    # 3: missing or unreadable inputs (data, model, checkpoint, media)
    MissingInputs: 3,
    LoaderError: 3,
    CheckpointError: 3,
    ConfigError: 3,
    WeightsError: 3,
    GenerateInputError: 3,
    # 4: a source rejected more than the manifest's threshold
    RejectRateExceeded: 4,
    # 5: the build output directory does not match, or is not a build
    BuildError: 5,
    StatsError: 5,
    ShardFormatError: 5,
    EnergonMetadataError: 5,
}
"""Exit code of each error class; an error takes the code of its most specific listed class."""
EXIT_VERIFY_PROBLEMS = 6
"""`lvita verify` found problems (a result, not an error: the report says which)."""
_UNPREFIXED = (ManifestError, TrainConfigError, RejectRateExceeded)
"""Errors reported as ``lvita: ...`` (no command name): what the manifest or config says."""


def exit_code(error: BaseException) -> int | None:
    """The exit code of `error` from `EXIT_CODES`, None for an error lvita does not expect."""
    for cls in type(error).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return None


def _cmd_plan(args: argparse.Namespace) -> int:
    from lvita_data.build.identity import input_identity
    from lvita_data.build.plan import plan_stage
    from lvita_data.build.report import format_report
    from lvita_data.manifest import load_manifest

    manifest = load_manifest(args.manifest)
    started = time.perf_counter()
    # taken before planning, so a record file changed meanwhile makes `lvita build --plan` refuse
    inputs = input_identity(manifest) if args.out else None
    plan = plan_stage(
        manifest,
        workers=args.workers,
        verify_media=args.verify_media,
        allow_missing=args.allow_missing,
        progress=not args.quiet,
        executor=args.executor,
    )
    plan.inputs = inputs
    seconds = time.perf_counter() - started
    print(format_report(plan))
    rate = plan.num_samples / seconds if seconds > 0 else float("inf")
    print(f"planned in {seconds:.1f} s ({rate:,.0f} samples/s, {args.workers} worker(s))")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        plan.write_json(args.out)
        print(f"wrote {args.out}")
    return EXIT_OK


def _cmd_build(args: argparse.Namespace) -> int:
    from lvita_data.build.run import build_stage

    started = time.perf_counter()
    index = build_stage(
        args.manifest,
        args.out,
        workers=args.workers,
        executor=args.executor,
        resume=args.resume,
        progress=not args.quiet,
        verify_media=args.verify_media,
        plan=args.plan,
    )
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
    """Print the report (or JSON) of a build; with --html also write the HTML report."""
    from lvita_data.stats.compute import compute_stats
    from lvita_data.stats.html import write_html
    from lvita_data.stats.text import format_stats

    stats = compute_stats(args.dir)
    if args.json:
        print(json.dumps(stats, ensure_ascii=False, indent=1))
    else:
        print(format_stats(stats))
    if args.html:
        write_html(stats, args.html)
        print(f"wrote {args.html}", file=sys.stderr if args.json else sys.stdout)
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    """Print the verify report (or JSON); `EXIT_VERIFY_PROBLEMS` when it found problems."""
    from lvita_data.verify import verify_build

    report = verify_build(
        args.dir,
        workers=args.workers,
        decode_tiles=not args.no_decode,
        progress=not args.quiet and not args.json,
    )
    if args.json:
        print(json.dumps(report.to_json(), ensure_ascii=False, indent=1))
    else:
        print(report.format())
    return EXIT_OK if report.ok else EXIT_VERIFY_PROBLEMS


def _cmd_show(args: argparse.Namespace) -> int:
    """One pack in the terminal (colours per --color), or with --html the page's path."""
    from lvita_data.show.html import write_html
    from lvita_data.show.read import show_pack
    from lvita_data.show.text import format_pack

    shown = show_pack(args.dir, pack=args.pack, key=args.key, with_tiles=bool(args.html))
    if args.html:
        write_html(shown.view, shown.tiles, args.html)
        print(f"wrote {args.html}")
        return EXIT_OK
    color = args.color == "always" or (
        args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    )
    print(format_pack(shown.view, color=color))
    return EXIT_OK


def _cmd_generate(args: argparse.Namespace) -> int:
    """Generated text on stdout, notes on stderr; rank 0 only under torchrun."""
    from pipelines.generate import GenerateRequest, generate_text

    generated = generate_text(
        GenerateRequest(
            model=args.model,
            prompt=args.prompt,
            images=args.image,
            videos=args.video,
            max_frames=args.max_frames,
            max_new_tokens=args.max_new_tokens,
            prefill_chunk=args.prefill_chunk,
            backend=args.backend,
            dtype=args.dtype,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
            tokenizer=args.tokenizer,
        )
    )
    if generated.is_main:
        for note in generated.notes:
            print(note, file=sys.stderr)
        print(generated.text)
    return EXIT_OK


def _cmd_train(args: argparse.Namespace) -> int:
    from pipelines.train.config import load_train_config

    config = load_train_config(args.config, args.set or ())
    if args.nproc_per_node < 1:
        raise TrainConfigError(f"--nproc-per-node {args.nproc_per_node}: at least 1")
    if args.nproc_per_node > 1:
        return _launch_train(args, config)
    from pipelines.train.loop import train

    train(config, resume=not args.no_resume)
    return EXIT_OK


def _launch_train(args: argparse.Namespace, config: TrainConfig) -> int:
    """`lvita train --nproc-per-node N`: the ranks (`pipelines.train.launch`), this process
    waiting for them; a failed rank's exit code is the command's."""
    from lvita_data.loader import ShardLoader
    from pipelines.train.launch import RankFailed, Stopped, launch
    from pipelines.train.loop import preflight, resolve_recipe

    if "RANK" in os.environ:
        raise TrainConfigError("--nproc-per-node starts the ranks itself: not under torchrun")
    # the checks every rank makes before step 1, made once here: one message, not one per rank
    ShardLoader(preflight(config, resolve_recipe(config), world_size=args.nproc_per_node))
    rank_argv = ["train", args.config, *(["--no-resume"] if args.no_resume else [])]
    for override in args.set or ():
        rank_argv += ["--set", override]
    try:
        launch(rank_argv, args.nproc_per_node)
    except Stopped as stopped:  # the command's own interrupt (`run`)
        raise KeyboardInterrupt if stopped.signum == signal.SIGINT else Terminated from None
    except RankFailed as failed:
        code = failed.exitcode if failed.exitcode >= 0 else 128 - failed.exitcode
        if code not in DOCUMENTED_EXITS:  # a documented code: the rank said why already
            print(f"lvita train: {failed} (no message: killed or crashed)", file=sys.stderr)
        return code
    return EXIT_OK


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from lvita_data.demo import make_demo_corpus

    summary = make_demo_corpus(args.dir, seed=args.seed)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return EXIT_OK
    rows = sum(summary["rows"].values())
    print(
        f"{summary['root']}: {len(summary['files'])} files, {summary['total_bytes']:,} bytes "
        f"(seed {summary['seed']}): {len(summary['rows'])} annotation files with {rows} records, "
        f"{len(summary['images'])} images, {len(summary['videos'])} videos, "
        f"{len(summary['frame_dirs'])} frame directories, {len(summary['bad'])} deliberately bad "
        f"records. Plan it: LVITA_DEMO_ROOT={summary['root']} lvita plan "
        "manifests/demo/stage2.yaml"
    )
    return EXIT_OK


class _HelpFormatter(argparse.HelpFormatter):
    """`--help` states an option's default where it says something (not None, not False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        meaningful = action.default not in (None, False, argparse.SUPPRESS)
        if meaningful and action.option_strings and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lvita",
        description=__doc__.split("\n")[0],
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lvita {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    plan = commands.add_parser(
        "plan",
        formatter_class=_HelpFormatter,
        help="exact token lengths of a stage, before decoding",
    )
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
    plan.add_argument(
        "--executor", choices=("local", "ray"), default="local", help="where file tasks run"
    )
    plan.set_defaults(run=_cmd_plan)

    build = commands.add_parser(
        "build",
        formatter_class=_HelpFormatter,
        help="packed WebDataset shards of a stage",
    )
    build.add_argument("manifest", help="stage manifest YAML")
    build.add_argument("--out", required=True, help="output directory")
    build.add_argument("--workers", type=int, default=1, help="parallel processes (or Ray CPUs)")
    build.add_argument(
        "--executor", choices=("local", "ray"), default="local", help="where shard tasks run"
    )
    build.add_argument("--resume", action="store_true", help="finish an interrupted build")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.add_argument(
        "--verify-media",
        action="store_true",
        help="decode every image while planning (else sizes and containers are checked)",
    )
    build.add_argument(
        "--plan",
        metavar="PLAN.json",
        help="build from this `lvita plan --out` file instead of planning again "
        "(refused unless made from the same manifest and record files)",
    )
    build.set_defaults(run=_cmd_build)

    stats = commands.add_parser(
        "stats",
        formatter_class=_HelpFormatter,
        help="fill, padding, lengths, shares, rejects of a build",
    )
    stats.add_argument("dir", help="build output directory")
    stats.add_argument("--json", action="store_true", help="print JSON instead of tables")
    stats.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report")
    stats.set_defaults(run=_cmd_stats)

    verify = commands.add_parser(
        "verify",
        formatter_class=_HelpFormatter,
        help="checksums, per-sample invariants, accounting",
    )
    verify.add_argument("dir", help="build output directory")
    verify.add_argument("--json", action="store_true", help="machine-readable report")
    verify.add_argument("--quiet", action="store_true", help="no progress bar")
    verify.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="parallel processes over shards (default: all cores, here %(default)s)",
    )
    verify.add_argument(
        "--no-decode",
        action="store_true",
        help="check PNG CRCs, image headers and containers; decode no tile or source image",
    )
    verify.set_defaults(run=_cmd_verify)

    show = commands.add_parser(
        "show",
        formatter_class=_HelpFormatter,
        help="one packed sequence as the model sees it (documents, label mask, tiles)",
    )
    show.add_argument("dir", help="build output directory")
    which = show.add_mutually_exclusive_group()
    which.add_argument(
        "--pack", type=int, help="global pack index, shards in index.json order (default: 0)"
    )
    which.add_argument("--key", help="the pack's sample key (e.g. 000000042)")
    show.add_argument("--html", metavar="FILE", help="write a self-contained HTML page instead")
    show.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="ANSI colours (auto: when stdout is a terminal and NO_COLOR is unset)",
    )
    show.set_defaults(run=_cmd_show)

    demo = commands.add_parser(
        "demo-data",
        formatter_class=_HelpFormatter,
        help="write the deterministic demo corpus",
    )
    demo.add_argument("dir", help="output directory")
    demo.add_argument("--seed", type=int, default=0, help="another seed, another corpus")
    demo.add_argument("--json", action="store_true", help="print every file and count as JSON")
    demo.set_defaults(run=_cmd_demo_data)

    generate = commands.add_parser(
        "generate",
        formatter_class=_HelpFormatter,
        help="generate text from a prompt (KV cache)",
    )
    generate.add_argument("model", help="checkpoint directory or preset name (random weights)")
    generate.add_argument("--prompt", required=True, help="the user's message")
    generate.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    generate.add_argument("--video", action="append", default=[], help="video file or frame dir")
    generate.add_argument("--max-frames", type=int, default=64, help="frames per video (1 fps cap)")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--prefill-chunk", type=int, help="prefill N prompt tokens at a time")
    generate.add_argument("--backend", default="auto", help="attention backend (auto, sdpa, ...)")
    generate.add_argument(
        "--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16")
    )
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    generate.add_argument("--top-k", type=int, default=0, help="sample among the k best (0: all)")
    generate.add_argument("--seed", type=int, default=0, help="sampling and random-model seed")
    generate.add_argument("--tokenizer", help="tokenizer spec (default: the checkpoint's, qwen2.5)")
    generate.set_defaults(run=_cmd_generate)

    train = commands.add_parser(
        "train",
        formatter_class=_HelpFormatter,
        help="train a stage on its packed shards (DP x CP)",
    )
    train.add_argument("config", help="training config YAML (configs/train/*.yaml)")
    train.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        metavar="N",
        help="start N ranks on this machine (as torchrun --standalone; Ctrl-C ends them all "
        "with one line)",
    )
    train.add_argument(
        "--no-resume",
        action="store_true",
        help="do not continue from the latest checkpoint (refused if output.dir has one)",
    )
    train.add_argument(
        "--set",
        action="append",
        metavar="KEY.SUB=VALUE",
        help="override a config field, as strictly typed as the YAML (repeatable): "
        "--set recipe.lr=2e-5 --set parallel.cp=4 --set output.dir=runs/x",
    )
    train.set_defaults(run=_cmd_train)
    return parser


EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_BROKEN_PIPE = 130, 143, 141
DOCUMENTED_EXITS = frozenset({*EXIT_CODES.values(), EXIT_INTERRUPTED, EXIT_TERMINATED})


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that `run` unwinds like on Ctrl-C."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def _resume_hint(args: argparse.Namespace, argv: list[str]) -> str:
    """What to run to finish the interrupted command."""
    again = ["lvita", *argv]
    if args.command == "build" and "--resume" not in argv:
        again.append("--resume")
    if args.command == "train":  # going on means resuming from the last checkpoint
        again = [arg for arg in again if arg != "--no-resume"]
        ranks = os.environ.get("LOCAL_WORLD_SIZE")
        if ranks and ranks == os.environ.get("WORLD_SIZE") != "1":  # torchrun, one machine
            again += ["--nproc-per-node", ranks]
    return shlex.join(again)


def _quiet_rank() -> bool:
    """A training rank whose interrupt line another process prints: every rank started by
    ``lvita train --nproc-per-node``, and every rank but 0 under torchrun."""
    from pipelines.train.launch import QUIET_RANK_ENV

    return QUIET_RANK_ENV in os.environ or os.environ.get("RANK", "0") != "0"


def run(argv: list[str] | None = None) -> int:
    """Run one `lvita` command; an expected error is one line on stderr and its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return args.run(args)
    except tuple(EXIT_CODES) as error:
        prefix = "lvita" if isinstance(error, _UNPREFIXED) else f"lvita {args.command}"
        print(f"{prefix}: {error}", file=sys.stderr)
        code = exit_code(error)
        assert code is not None
        return code
    except (KeyboardInterrupt, Terminated) as error:
        what = "interrupted" if isinstance(error, KeyboardInterrupt) else "terminated"
        if not (args.command == "train" and _quiet_rank()):
            print(
                f"lvita {args.command}: {what}; finished work is kept. To go on: "
                f"{_resume_hint(args, argv)}",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED if isinstance(error, KeyboardInterrupt) else EXIT_TERMINATED
    except BrokenPipeError:
        # the reader went away (`lvita plan | head`): no traceback, and none at exit either
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> None:
    """The `lvita` entry point: `run`, then exit with its code."""
    raise SystemExit(run(argv))


if __name__ == "__main__":
    main()
