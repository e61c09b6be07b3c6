"""What each registered metric costs per evaluation, given the features (the Inception pass is not timed).

    python -m studies.bench.metrics                          # 1,000 reference x 500 generated features, 2048-d
    python -m studies.bench.metrics --ref 50000 --gen 50000 --repeats 1     # the default preset's final protocol

Features are random (normal, like Inception's after centring; the metrics' cost does not depend on the values).
Each metric runs once to warm up, then --repeats times; the median and the fastest of the timed calls are
printed per metric, with the CPU they ran on (a GPU, where there is one, computes the k-NN metrics).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from core.metrics import list_metrics, measure
from core.reference import ReferenceStats
from core.reference import statistics as feature_statistics
from studies.bench.cpu import cpu_name
from studies.cli import command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studies.bench.metrics", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", type=int, default=1000, help="reference (real) features (default: 1000)")
    p.add_argument("--gen", type=int, default=500, help="generated features (default: 500)")
    p.add_argument("--dim", type=int, default=2048, help="feature dimension (default: 2048, Inception's)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per metric after one warm-up (default: 5)")
    p.add_argument("--out", type=Path, default=None, help="also write the timings as JSON here")
    return p


def bench(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(0)
    real = rng.normal(size=(args.ref, args.dim)).astype(np.float32)
    mu, sigma = feature_statistics(real)
    ref = ReferenceStats(mu, sigma, args.ref, "bench", Path("bench"), real)
    fake = rng.normal(size=(args.gen, args.dim)).astype(np.float32)
    out = {"cpu": cpu_name(), "ref": args.ref, "gen": args.gen, "dim": args.dim, "seconds": {}}
    print(f"{args.ref} reference x {args.gen} generated features, {args.dim}-d, on {out['cpu']}")
    for name in list_metrics():
        measure(fake, ref, [name])  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            measure(fake, ref, [name])
            times.append(time.perf_counter() - start)
        out["seconds"][name] = {"median": statistics.median(times), "min": min(times)}
        print(f"  {name:8s} median {statistics.median(times):.3f} s, fastest {min(times):.3f} s "
              f"({args.repeats} calls)", flush=True)
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))
    return out


main = command(build_parser, lambda args: bench(args) and None)


if __name__ == "__main__":
    raise SystemExit(main())
