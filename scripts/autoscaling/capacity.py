"""The per-pod capacity curve (bench/capacity.json; format in docs/autoscaling.md) and the log-normals drawn from it."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

Z99 = 2.3263478740408408  # standard normal 99th percentile


def lognormal(p50: float, p99: float) -> tuple[float, float]:
    p50 = max(float(p50), 1e-9)
    p99 = max(float(p99), p50)
    return math.log(p50), (math.log(p99 / p50) / Z99 if p99 > p50 else 0.0)


def _interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    return float(np.interp(x, xs, ys))


@dataclass
class Capacity:
    """Per-pod serving capacity measured at fixed concurrency levels, plus cold-start and workload numbers.
    See bench/capacity.json and docs/autoscaling.md for the file format."""
    concurrency: list[float]
    ttft_p50: list[float]
    ttft_p99: list[float]
    tpot_p50: list[float]
    tpot_p99: list[float]
    tokens_per_s: list[float]
    cpu_util: list[float] | None
    idle_cpu_util: float = 0.02
    cold_start_samples: list[float] | None = None
    cold_start_p50: float = 60.0
    cold_start_p99: float = 120.0
    max_num_seqs: int = 32
    max_queue_size: int = 128
    output_tokens_p50: float = 128.0
    output_tokens_p99: float = 512.0
    max_tokens: int = 1024
    source: str = ""
    placeholder: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "Capacity":
        levels = sorted(d["levels"], key=lambda lv: lv["concurrency"])
        if not levels:
            raise ValueError("capacity: 'levels' is empty")
        conc = [float(lv["concurrency"]) for lv in levels]

        def q(lv: dict, key: str, p: str) -> float:
            v = lv[key]
            return float(v[p] if isinstance(v, dict) else v)

        ttft50 = [q(lv, "ttft_s", "p50") for lv in levels]
        ttft99 = [q(lv, "ttft_s", "p99") if isinstance(lv["ttft_s"], dict) else q(lv, "ttft_s", "p50")
                  for lv in levels]
        tpot50, tpot99, tps = [], [], []
        for lv, c in zip(levels, conc):
            if "tpot_s" in lv:
                t50 = q(lv, "tpot_s", "p50")
                t99 = q(lv, "tpot_s", "p99") if isinstance(lv["tpot_s"], dict) else t50
            else:  # derive from aggregate throughput: each of c streams gets tokens_per_s / c
                t50 = t99 = c / float(lv["output_tokens_per_s"])
            tpot50.append(t50)
            tpot99.append(t99)
            tps.append(float(lv.get("output_tokens_per_s", c / t50)))
        cpu = None
        if all("cpu_util" in lv and lv["cpu_util"] is not None for lv in levels):
            cpu = [float(lv["cpu_util"]) for lv in levels]
        cs = d.get("cold_start_s", {})
        if isinstance(cs, (int, float)):
            cs = {"p50": cs, "p99": cs}
        samples = [float(x) for x in cs.get("samples", [])] or None
        if samples:
            p50, p99 = float(np.percentile(samples, 50)), float(np.percentile(samples, 99))
        else:
            p50 = float(cs.get("p50", 60.0))
            p99 = float(cs.get("p99", p50))
        eng = d.get("engine", {})
        wl = d.get("workload", {})
        ot = wl.get("output_tokens", {})
        if isinstance(ot, (int, float)):
            ot = {"p50": ot, "p99": ot}
        return cls(concurrency=conc, ttft_p50=ttft50, ttft_p99=ttft99, tpot_p50=tpot50, tpot_p99=tpot99,
                   tokens_per_s=tps, cpu_util=cpu, idle_cpu_util=float(d.get("idle_cpu_util", 0.02)),
                   cold_start_samples=samples, cold_start_p50=p50, cold_start_p99=p99,
                   max_num_seqs=int(eng.get("max_num_seqs", 32)),
                   max_queue_size=int(eng.get("max_queue_size", 4 * int(eng.get("max_num_seqs", 32)))),
                   output_tokens_p50=float(ot.get("p50", 128)), output_tokens_p99=float(ot.get("p99", 512)),
                   max_tokens=int(wl.get("max_tokens", 1024)), source=str(d.get("source", "")),
                   placeholder=bool(d.get("placeholder", "PLACEHOLDER" in str(d.get("source", "")).upper())))

    @classmethod
    def load(cls, path: str) -> "Capacity":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def latency_table(self, n_max: int) -> list[tuple[float, float, float, float]]:
        """(mu_ttft, sigma_ttft, mu_tpot, sigma_tpot) of the log-normals at each concurrency 0..n_max
        (linear interpolation between levels, held constant outside them)."""
        table = []
        for n in range(n_max + 1):
            x = max(n, 1)
            m1, s1 = lognormal(_interp(x, self.concurrency, self.ttft_p50), _interp(x, self.concurrency,
                                                                                    self.ttft_p99))
            m2, s2 = lognormal(_interp(x, self.concurrency, self.tpot_p50), _interp(x, self.concurrency,
                                                                                    self.tpot_p99))
            table.append((m1, s1, m2, s2))
        return table

    def cpu_at(self, n: float) -> float:
        """Modelled CPU utilisation (fraction of the pod's CPU request) at mean concurrency n."""
        if self.cpu_util is None:
            raise ValueError("capacity file has no cpu_util per level: the HPA baseline needs it")
        xs = [0.0] + list(self.concurrency)
        ys = [self.idle_cpu_util] + list(self.cpu_util)
        return _interp(n, xs, ys)

    def sample_cold_starts(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.cold_start_samples:
            return rng.choice(np.asarray(self.cold_start_samples), size=n)
        mu, sig = lognormal(self.cold_start_p50, self.cold_start_p99)
        return np.exp(mu + sig * rng.standard_normal(n))
