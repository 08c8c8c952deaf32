"""Traffic traces: arrival times and output tokens per request, read from a CSV or generated (a seeded diurnal day)."""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass

import numpy as np

from .capacity import Capacity, lognormal


@dataclass
class Trace:
    arrivals: np.ndarray                 # seconds, sorted
    output_tokens: np.ndarray            # per request
    horizon: float                       # seconds simulated (cost window)
    description: str = ""

    def save_csv(self, path: str) -> None:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["arrival_s", "output_tokens"])
            for t, n in zip(self.arrivals.tolist(), self.output_tokens.tolist()):
                w.writerow([f"{t:.3f}", int(n)])


def sample_output_tokens(cap: Capacity, rng: np.random.Generator, n: int) -> np.ndarray:
    mu, sig = lognormal(cap.output_tokens_p50, cap.output_tokens_p99)
    toks = np.exp(mu + sig * rng.standard_normal(n))
    return np.clip(np.rint(toks), 1, cap.max_tokens).astype(np.int64)


def load_trace(path: str, cap: Capacity, seed: int = 0, horizon: float | None = None) -> Trace:
    """CSV: first column arrival time in seconds (relative, or epoch seconds which are shifted to start at 0),
    optional second column output tokens; a header row is allowed; lines starting with # are skipped."""
    ts, toks = [], []
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row or row[0].lstrip().startswith("#"):
                continue
            try:
                t = float(row[0])
            except ValueError:
                continue  # header
            ts.append(t)
            toks.append(float(row[1]) if len(row) > 1 and row[1].strip() else math.nan)
    if not ts:
        raise ValueError(f"{path}: no arrival times")
    a = np.asarray(ts, dtype=float)
    order = np.argsort(a, kind="stable")
    a = a[order]
    k = np.asarray(toks, dtype=float)[order]
    if a[0] > 365 * 86400:  # epoch timestamps
        a = a - math.floor(a[0])
    rng = np.random.default_rng(seed)
    missing = np.isnan(k)
    if missing.any():
        k[missing] = sample_output_tokens(cap, rng, int(missing.sum()))
    hz = horizon if horizon is not None else float(math.ceil(a[-1] + 1))
    return Trace(a, np.maximum(1, k).astype(np.int64), hz, f"{os.path.basename(path)} ({len(a)} requests)")


def generate_diurnal(cap: Capacity, hours: float = 24.0, peak_rps: float = 1.0, seed: int = 0,
                     bursts_per_day: float = 6.0, night: tuple[float, float] = (1.0, 6.5),
                     night_trickle_per_hour: float = 2.0, start_hour: float = 0.0) -> Trace:
    """A seeded synthetic day: two daytime humps (late morning, evening), quiet early hours with an occasional
    request (idle nights: scale-to-zero territory), plus random bursts of 2-10 minutes at 1-3x the peak rate on top.
    Arrivals are a non-homogeneous Poisson process at 1 s resolution."""
    rng = np.random.default_rng(seed)
    n_sec = int(round(hours * 3600))
    t = np.arange(n_sec) + 0.5
    h = (start_hour + t / 3600.0) % 24.0
    shape = 0.12 + 0.55 * np.exp(-((h - 11.0) / 2.5) ** 2) + 0.5 * np.exp(-((h - 20.5) / 2.0) ** 2)
    quiet = (h >= night[0]) & (h < night[1]) if night[0] <= night[1] else (h >= night[0]) | (h < night[1])
    rise = np.clip((h - night[1]) % 24.0 / 1.5, 0, 1)                   # 1.5 h ramp after the night
    fade_len = 3.0
    d = (h - (night[0] - fade_len)) % 24.0                              # 3 h fade into the night
    fade = np.where(d < fade_len, 1.0 - d / fade_len, 1.0)
    envelope = np.where(quiet, 0.0, np.minimum(rise, fade))
    rate = peak_rps * shape / shape.max() * envelope
    rate = np.where(quiet, night_trickle_per_hour / 3600.0, rate)
    n_b = rng.poisson(bursts_per_day * hours / 24.0)
    daytime = np.flatnonzero(~quiet & (rate > 0.2 * peak_rps))
    for _ in range(n_b if len(daytime) else 0):
        s0 = int(rng.choice(daytime))
        dur = int(rng.uniform(120, 600))
        rate[s0:s0 + dur] += peak_rps * rng.uniform(1.0, 3.0)
    counts = rng.poisson(rate)
    secs = np.repeat(np.arange(n_sec, dtype=float), counts)
    arrivals = np.sort(secs + rng.random(len(secs)))
    toks = sample_output_tokens(cap, rng, len(arrivals))
    return Trace(arrivals, toks, float(n_sec),
                 f"generated diurnal: {hours:g} h, peak {peak_rps:g} req/s, {n_b} bursts, seed {seed} "
                 f"({len(arrivals)} requests)")
