"""Logits-masked LM head against the full-logits head: peak memory, time, equal loss and grads.

Setup: T tokens (default 32,768 on CUDA, 4,096 on CPU, where the full head at 32K would need
~40-60 GB), vocabulary V = 152,064 (Qwen2.5), hidden H = 896 (Qwen2.5-0.5B; --hidden 5120 for the
14B), 10% of positions supervised (seeded random positions and token ids), fp32 by default.
hidden ~ N(0, 1), weight ~ N(0, 0.02). One step = forward + backward of loss_sum / count.

Variants (lvita_model.head):
  full               full_logits_loss: [T, V] logits, F.cross_entropy(reduction="sum") in fp32
  masked/forward     masked_lm_loss(grad_mode="forward"): gradients computed chunk by chunk in
                     forward (chunk_rows rows of logits at a time), scaled in backward
  masked/recompute   masked_lm_loss(grad_mode="recompute"): loss in forward, chunks recomputed
                     in backward

Memory. CUDA: one process; per variant torch.cuda.reset_peak_memory_stats() after the inputs
exist, then max_memory_allocated(); "above inputs" subtracts memory_allocated() at that point
(the inputs' own bytes), "total" does not. CPU: each variant runs in its own subprocess; after the
inputs are created the RSS high-water mark is reset (`/proc/self/clear_refs` = 5), and the peak
is VmHWM minus VmRSS at that point ("total" = VmHWM, which includes Python and torch). glibc's
mmap threshold is pinned to 1 MiB (MALLOC_MMAP_THRESHOLD_) so freed large tensors leave the RSS,
as they leave max_memory_allocated on CUDA. Both include the gradients hidden.grad and
weight.grad, which every variant produces.

Equality. loss, d_hidden and d_weight of each masked variant against full: max |diff| and
max |diff| / max |ref|; "allclose" = torch.allclose(rtol=atol=1e-5) on all three (2e-2 for bf16,
where both heads round differently). TF32 is off. Goal: masked/forward peak <= 0.15 x full.

The table is printed and written into --out under a section per (device, T, H, dtype); sections
of other runs in that file are kept.

    PYTHONPATH=. python benchmarks/bench_head.py [--tokens T] [--hidden 896|5120] [--dtype fp32]
        [--device auto|cpu|cuda] [--chunk-rows 4096] [--repeat N] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch

from lvita_model.baselines import full_logits_loss
from lvita_model.head import masked_lm_loss

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("full", "masked/forward", "masked/recompute")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}  # rtol = atol for torch.allclose
MIB = 2**20
GOAL = 0.15


@dataclass
class Result:
    variant: str
    peak_above: int  # bytes above the inputs
    peak_total: int  # bytes, inputs (and on CPU the process) included
    seconds: float  # median step time
    loss: torch.Tensor
    d_hidden: torch.Tensor  # on CPU
    d_weight: torch.Tensor  # on CPU


def make_inputs(args, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [T, H], weight [V, H], targets [T]) from --seed, identical on every device."""
    gen = torch.Generator().manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    hidden = torch.randn(args.tokens, args.hidden, generator=gen).to(device, dtype)
    weight = (torch.randn(args.vocab, args.hidden, generator=gen) * 0.02).to(device, dtype)
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=gen)
    num_supervised = round(args.supervised * args.tokens)
    unsupervised = torch.randperm(args.tokens, generator=gen)[num_supervised:]
    targets[unsupervised] = -100
    return hidden.requires_grad_(), weight.requires_grad_(), targets.to(device)


def step(variant: str, hidden, weight, targets, chunk_rows: int) -> torch.Tensor:
    """One forward + backward of loss_sum / count; returns the detached loss_sum."""
    hidden.grad = weight.grad = None
    if variant == "full":
        loss_sum, count = full_logits_loss(hidden, weight, targets)
    else:
        mode = variant.split("/")[1]
        loss_sum, count = masked_lm_loss(
            hidden, weight, targets, chunk_rows=chunk_rows, grad_mode=mode
        )
    (loss_sum / count.clamp(min=1)).backward()
    return loss_sum.detach()


def timed(fn, sync) -> tuple[float, object]:
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


# ----------------------------------------------------------------------------------------------
# CUDA: one process, torch's allocator statistics


def run_cuda(args, device: torch.device) -> list[Result]:
    torch.backends.cuda.matmul.allow_tf32 = False
    hidden, weight, targets = make_inputs(args, device)
    results = []
    for variant in VARIANTS:
        run = lambda v=variant: step(v, hidden, weight, targets, args.chunk_rows)  # noqa: E731
        for _ in range(args.warmup):
            run()
        hidden.grad = weight.grad = None
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeat):
            seconds, loss = timed(run, torch.cuda.synchronize)
            times.append(seconds)
        peak = torch.cuda.max_memory_allocated()
        results.append(
            Result(
                variant, peak - base, peak, median(times), loss.cpu(), *cpu_grads(hidden, weight)
            )
        )
        hidden.grad = weight.grad = None
    return results


def cpu_grads(hidden, weight) -> tuple[torch.Tensor, torch.Tensor]:
    return hidden.grad.detach().cpu(), weight.grad.detach().cpu()


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


# ----------------------------------------------------------------------------------------------
# CPU: one subprocess per variant, RSS high-water mark


def proc_status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else None


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return proc_status_kib("VmHWM") is not None


def peak_rss_kib() -> int:
    hwm = proc_status_kib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def worker(args) -> None:
    """Run one variant in this process and torch.save its Result to --result."""
    hidden, weight, targets = make_inputs(args, torch.device("cpu"))
    run = lambda: step(args.worker, hidden, weight, targets, args.chunk_rows)  # noqa: E731
    for _ in range(args.warmup):
        run()
    hidden.grad = weight.grad = None
    exact = reset_peak_rss()
    base_kib = proc_status_kib("VmRSS") if exact else peak_rss_kib()
    times = []
    for _ in range(args.repeat):
        seconds, loss = timed(run, lambda: None)
        times.append(seconds)
    peak_kib = peak_rss_kib()
    result = Result(
        args.worker,
        (peak_kib - base_kib) * 1024,
        peak_kib * 1024,
        median(times),
        loss,
        *cpu_grads(hidden, weight),
    )
    torch.save({"result": result.__dict__, "exact": exact}, args.result)


def run_cpu(args) -> tuple[list[Result], bool]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MIB))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    results, exact = [], True
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            path = Path(tmp) / "result.pt"
            cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", variant]
            subprocess.run([*cmd, "--result", str(path), "--device", "cpu"], env=env, check=True)
            saved = torch.load(path, weights_only=False)
            results.append(Result(**saved["result"]))
            exact &= saved["exact"]
            path.unlink()
    return results, exact


# ----------------------------------------------------------------------------------------------
# Report


def max_diff(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |got - ref|, that / max |ref|) in float64."""
    diff = (got.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    return diff, diff / scale if scale else 0.0


def table(results: list[Result], tol: float) -> list[str]:
    ref = results[0]
    lines = [
        "| variant | peak MiB above inputs | peak MiB total | ratio vs full | loss_sum | "
        "loss max abs (rel) | d_hidden max abs (rel) | d_weight max abs (rel) | "
        f"allclose {tol:g} | step s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        loss_d, loss_rel = max_diff(res.loss, ref.loss)
        dh, dh_rel = max_diff(res.d_hidden, ref.d_hidden)
        dw, dw_rel = max_diff(res.d_weight, ref.d_weight)
        pairs = ((res.loss, ref.loss), (res.d_hidden, ref.d_hidden), (res.d_weight, ref.d_weight))
        close = all(torch.allclose(a, b, rtol=tol, atol=tol) for a, b in pairs)
        lines.append(
            f"| {res.variant} | {res.peak_above / MIB:,.0f} | {res.peak_total / MIB:,.0f} | "
            f"{res.peak_above / ref.peak_above:.3f} | {res.loss.item():,.2f} | "
            f"{loss_d:.1e} ({loss_rel:.1e}) | "
            f"{dh:.1e} ({dh_rel:.1e}) | {dw:.1e} ({dw_rel:.1e}) | {'yes' if close else 'NO'} | "
            f"{res.seconds:.3f} |"
        )
    return lines


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if "model name" in line
            ),
            platform.machine(),
        )
    return (
        f"{date.today()}, {name}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def analytic(args) -> str:
    item = torch.tensor([], dtype=DTYPES[args.dtype]).element_size()
    num_sup = round(args.supervised * args.tokens)
    rows = min(args.chunk_rows, num_sup)
    return (
        f"Sizes: full fp32 logits T x V = {args.tokens * args.vocab * 4 / MIB:,.0f} MiB; one "
        f"chunk {rows:,} x V fp32 = {rows * args.vocab * 4 / MIB:,.0f} MiB; weight V x H = "
        f"{args.vocab * args.hidden * item / MIB:,.0f} MiB ({args.dtype}); its fp32 gradient "
        f"accumulator {args.vocab * args.hidden * 4 / MIB:,.0f} MiB; M = {num_sup:,} supervised."
    )


def section(args, device: torch.device, results: list[Result], method: str) -> tuple[str, str]:
    key = f"{device.type} T={args.tokens} V={args.vocab} H={args.hidden} {args.dtype}"
    ratio = results[1].peak_above / results[0].peak_above
    verdict = "meets" if ratio <= GOAL else "MISSES"
    body = [
        f"## {key}",
        "",
        "`" + " ".join(["PYTHONPATH=. python benchmarks/bench_head.py", *sys.argv[1:]]) + "`",
        "",
        machine(device),
        "",
        f"T = {args.tokens:,}, V = {args.vocab:,}, H = {args.hidden}, {args.dtype}, "
        f"{args.supervised:.0%} supervised, chunk_rows = {args.chunk_rows}, "
        f"warm-up {args.warmup}, median of {args.repeat} step(s). {analytic(args)}",
        "",
        *table(results, TOLERANCE[args.dtype]),
        "",
        f"masked/forward peak = {ratio:.3f} x full: {verdict} the goal (<= {GOAL}).",
        f"Memory method: {method}",
        "",
    ]
    return key, "\n".join(body)


def write_section(path: Path, key: str, text: str) -> None:
    """Replace this run's section in `path` (between markers), keep the others."""
    header = (
        "# LM head benchmark (`benchmarks/bench_head.py`)\n\n"
        "Logits-masked head (`lvita_model.head.masked_lm_loss`) against the full-logits head; the "
        "script's docstring gives the setup and the measuring method. One section per run.\n"
    )
    old = path.read_text() if path.exists() else header
    begin, end = f"<!-- begin {key} -->", f"<!-- end {key} -->"
    block = f"{begin}\n{text}{end}\n"
    if begin in old:
        old = old[: old.index(begin)] + block + old[old.index(end) + len(end) + 1 :]
    else:
        old = old.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(old)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--tokens", type=int, help="default 32768 on CUDA, 4096 on CPU")
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--hidden", type=int, default=896, help="896 (0.5B) or 5120 (14B)")
    parser.add_argument("--supervised", type=float, default=0.1)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--chunk-rows", type=int, default=4096)
    parser.add_argument("--warmup", type=int, help="default 1 on CUDA, 0 on CPU")
    parser.add_argument("--repeat", type=int, help="default 3 on CUDA, 1 on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/head.md")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    args.tokens = args.tokens or (32768 if cuda else 4096)
    args.warmup = args.warmup if args.warmup is not None else int(cuda)
    args.repeat = args.repeat or (3 if cuda else 1)
    if args.worker:
        worker(args)
        return
    if cuda:
        results = run_cuda(args, device)
        method = "torch.cuda.max_memory_allocated after reset_peak_memory_stats."
    else:
        print(f"CPU: T = {args.tokens:,} (the full head at 32,768 needs ~40-60 GB); one subprocess")
        print("per variant, peak RSS above the RSS after the inputs were created.")
        results, exact = run_cpu(args)
        method = (
            "VmHWM (reset via /proc/self/clear_refs after the inputs exist) minus VmRSS then, one "
            "subprocess per variant, MALLOC_MMAP_THRESHOLD_=1 MiB."
            if exact
            else "ru_maxrss delta (the high-water mark could not be reset: an upper bound)."
        )
    key, text = section(args, device, results, method)
    print(text)
    write_section(args.out, key, text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
