"""Memory read bandwidth of this machine, the denominator of the decode roofline.

Sums a large float32 tensor (1 GiB by default) with all of torch's threads: a reduction reads every
byte once and does one add per 4 bytes, far below what the cores can compute, so its speed is the
speed of reading memory. The tensor is written first so every page is resident, one sum is run to
warm up, and the best of the timed sums is the bandwidth (the machine's capability; the median is
reported too, to show contention from other processes).

    python -m bench.membw [--gib 1] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

GIB = 1 << 30


@dataclass(frozen=True)
class Bandwidth:
    """Read bandwidth in bytes/s: `best` over the timed repeats, and their `median`."""

    bytes_read: int
    threads: int
    best_bytes_per_s: float
    median_bytes_per_s: float

    @property
    def best_gb_per_s(self) -> float:
        return self.best_bytes_per_s / 1e9

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self) | {"best_gb_per_s": self.best_gb_per_s}


def measure_read_bandwidth(gib: float = 1.0, repeats: int = 10) -> Bandwidth:
    """Time `repeats` sums of a `gib`-GiB float32 tensor after one warm-up sum."""
    n = int(gib * GIB) // 4
    data = torch.ones(n, dtype=torch.float32)
    data.sum()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        data.sum()
        rates.append(data.nbytes / (time.perf_counter() - t0))
    del data
    return Bandwidth(
        bytes_read=n * 4,
        threads=torch.get_num_threads(),
        best_bytes_per_s=max(rates),
        median_bytes_per_s=statistics.median(rates),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    print(json.dumps(measure_read_bandwidth(args.gib, args.repeats).as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
