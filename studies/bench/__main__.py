"""Trainer speed against a plain PyTorch loop, FID wall time and peak memory: one run, the same data.

    python -m studies.bench                        # GPU: batch 64,128,256, FID-10k; table + bench.json
    python -m studies.bench --data /tmp/celeba/img_align_celeba --workers 14 --check-resize 500 \\
        --set eval.weights=/tmp/fid/fid_inception_tf.pt --out $OUT/bench.json        # the H100 session
    python -m studies.bench --compile --batches 256 --fid-samples 0   # + torch.compile, NCHW and channels_last
    python -m studies.bench --preset quick --batches 8 --steps 3 --warmup 2 --fid-samples 32 --workers 0  # CPU
    python -m studies.bench --check-resize 500 --batches '' --fid-samples 0   # FID: clean-fid resize vs torch

For each batch size the suite's trainer is built by core.build.build_run (FID off; bf16 autocast and
channels_last on CUDA), its first losses are checked against the plain fp32 step from the same seed and
batches, and after warm-up its steps are timed between CUDA synchronisations. Then the plain loop
(studies/bench/plain.py: DataLoader, PIL transforms, fp32, NCHW) is timed on the same images. --compile
adds torch.compile variants (NCHW and channels_last); a variant that fails is recorded with its error
instead of ending the bench. MFU = img/s x FLOPs per image of one real training step (counted with
FlopCounterMode) / --peak-tflops. FID is timed on the last trained G for each resize in --fid-resize,
sampling included; reference statistics are computed once (and cached) outside the timing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from core.config import FID_RESIZES
from core.errors import UserError
from studies.bench.measure import DEFAULT_WORKERS, H100_BF16_TFLOPS, LOSS_CHECK_STEPS, BenchSpec, run_bench
from studies.bench.table import table
from studies.cli import add_flags, command, overrides_from


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studies.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, "--data", "--preset")
    p.add_argument("--batches", default="64,128,256",
                   help="comma-separated batch sizes; '' = none (default: 64,128,256)")
    p.add_argument("--steps", type=int, default=100, help="timed training steps per config (default: 100)")
    p.add_argument("--warmup", type=int, default=10,
                   help=f"untimed steps first; the first {LOSS_CHECK_STEPS} are checked against the plain step "
                   "(default: 10)")
    p.add_argument("--fid-samples", type=int, default=10000, help="generated images for the timed FID; 0 = skip "
                   "(default: 10000)")
    p.add_argument("--fid-resize", default=",".join(FID_RESIZES),
                   help=f"resizes to time FID with, comma-separated (default: {','.join(FID_RESIZES)})")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                   help=f"DataLoader workers of the plain loop (default: min(14, CPU cores) = {DEFAULT_WORKERS})")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="also time torch.compile variants, NCHW and channels_last; CUDA only (default: --no-compile)")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS,
                   help=f"the device's peak for MFU, in TFLOP/s (default: {H100_BF16_TFLOPS:g}, H100 SXM dense bf16)")
    p.add_argument("--check-resize", type=int, default=0, metavar="N",
                   help="also compare FID of N vs N real images under both resizes; 0 = skip (default: 0)")
    p.add_argument("--check-resolution", type=int, default=128, help="image side for --check-resize (default: 128)")
    add_flags(p, "--set")
    p.add_argument("--out", type=Path, default=Path("bench.json"), help="JSON results (default: bench.json)")
    return p


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{flag} expects comma-separated integers, got '{text}'") from None
    if any(v < 1 for v in values):
        raise UserError(f"{flag} values must be >= 1, got '{text}'")
    return values


def spec_from_args(args: argparse.Namespace, command_line: str) -> BenchSpec:
    return BenchSpec(preset=args.preset, overrides=overrides_from(args), batches=_ints(args.batches, "--batches"),
                     steps=args.steps, warmup=args.warmup, fid_samples=args.fid_samples,
                     fid_resizes=tuple(r for r in args.fid_resize.split(",") if r), workers=args.workers,
                     compile=args.compile, peak_tflops=args.peak_tflops, check_resize=args.check_resize,
                     check_resolution=args.check_resolution, command=command_line)


def bench(args: argparse.Namespace) -> int:
    def write(result: dict) -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))

    def report(result: dict, line: str) -> None:  # after every measurement: a killed bench keeps what it had
        print(line, file=sys.stderr, flush=True)
        write(result)

    result = run_bench(spec_from_args(args, "python -m studies.bench " + shlex.join(args.argv)), report)
    write(result)
    print(table(result))
    print(f"wrote {args.out}")
    return 0


main = command(build_parser, bench, interrupted="interrupted: --out holds what was measured so far")


if __name__ == "__main__":
    sys.exit(main())
