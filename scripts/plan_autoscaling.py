#!/usr/bin/env python3
"""Plan Knative autoscaling for the AutoGLM-Phone-9B function: a discrete-event model of Knative's KPA (and, as a
baseline, a Kubernetes HPA on CPU) driven by a measured per-pod capacity curve and a traffic trace.

    python scripts/plan_autoscaling.py --capacity bench/capacity.json --generate diurnal \
        --p99-slo 5 --gpu-hour-price 2.5 --plot out/plan.png --json out/plan.json --markdown out/plan.md

The planner is the package scripts/autoscaling/ (what is modelled: its docstring; details and links:
docs/autoscaling.md); this file is its command line and re-exports its public names, so that
`import plan_autoscaling as pa` (with scripts/ on sys.path) reaches them.
"""
from __future__ import annotations

import os
import sys

if os.path.dirname(os.path.abspath(__file__)) not in [os.path.abspath(p) for p in sys.path]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # loaded by path: autoscaling/ is beside it

from autoscaling import *  # noqa: E402,F401,F403 - the public names
from autoscaling import __all__, main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
