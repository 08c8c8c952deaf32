"""Fresh Python processes for import-time checks: what a start imports is only visible in a process that has
imported nothing yet."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def fake_package(root: Path, module: str, dist: str) -> None:
    """An importable package with distribution metadata, so transformers' is_*_available() says it is installed;
    importing it is what the tests look for."""
    (root / module).mkdir(parents=True)
    (root / module / "__init__.py").write_text("__version__ = '99.0'\n")
    info = root / f"{dist.replace('-', '_')}-99.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 99.0\n")
    (info / "top_level.txt").write_text(module + "\n")


def run_json(code: str, env_path: list[Path] = (), timeout: int = 300) -> dict:
    """Run `code` in a fresh interpreter (the repo and `env_path` on its path); its last stdout line, as JSON."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *map(str, env_path)]))
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])
