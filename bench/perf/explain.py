"""Cost of Integrated Gradients on the zoo: wall time and peak memory of one IG run.

The issue's budget: IG (n_steps = 32) for the 1,000 ``mnist5k`` test images of ``mnist-cnn``
in under a minute on 2 CPU cores, within 2 GiB of memory. Run it in a fresh process (peak
memory is the process's maximum resident set size, model and data included)::

    python -m unmask.bench.perf.explain --threads 2 --n-steps 32 --internal-batch-size 256

Prints one JSON line with the wall time, the process's CPU time and the load average. Timings
on a shared machine are noisy: compare ``cpu_seconds / threads`` with the wall time, repeat,
and take the minimum. Under contention, one intra-op thread is often faster than two.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch

from ...explain.attribution import integrated_gradients
from .. import data, zoo


def measure(model_name: str = "mnist-cnn", *, n: int | None = None, n_steps: int = 32,
            internal_batch_size: int = 256, threads: int = 2, device: str = "cpu") -> dict:
    """Time IG over the test split of ``model_name``'s dataset; returns the numbers as a dict."""

    model = zoo.load(model_name, device=device, progress=False)
    x, y = data.load(zoo.get(model_name).dataset, "test", n=n)
    x, y = x.to(device), y.to(device)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start, cpu_start = time.perf_counter(), time.process_time()
        res = integrated_gradients(model, x, y, n_steps=n_steps,
                                   internal_batch_size=internal_batch_size)
        seconds = time.perf_counter() - start
        # CPU time of this process: on a shared machine the wall time also measures the others.
        cpu_seconds = time.process_time() - cpu_start
    finally:
        torch.set_num_threads(old_threads)
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"model": model_name, "images": int(x.shape[0]), "n_steps": n_steps,
            "internal_batch_size": internal_batch_size, "threads": threads, "device": device,
            "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
            "load_average_1min": round(os.getloadavg()[0], 2), "images_per_second": round(x.shape[0] / seconds, 1),
            "peak_rss_mib": round(peak * unit / 2**20, 1),
            "peak_rss_before_ig_mib": round(base * unit / 2**20, 1),
            "mean_relative_completeness_error": float(res.relative_error.mean()),
            "max_relative_completeness_error": float(res.relative_error.max())}


def main(argv: list[str] | None = None) -> int:
    """Command line of the IG cost measurement (see the module docstring); returns the exit
    status.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mnist-cnn")
    p.add_argument("--n", type=int, default=None, help="images (default: the whole test split)")
    p.add_argument("--n-steps", type=int, default=32)
    p.add_argument("--internal-batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    print(json.dumps(measure(args.model, n=args.n, n_steps=args.n_steps,
                             internal_batch_size=args.internal_batch_size, threads=args.threads,
                             device=args.device)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
