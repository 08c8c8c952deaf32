"""The README stays true: every setting is documented, the test command is the one CI runs, and the scripts it
names exist."""
from pathlib import Path

from function.config import ENV_VARS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table():
    missing = [name for name in ENV_VARS if f"| `{name}` |" not in README]
    assert not missing, f"README's configuration table lacks {missing}"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q" in README and "python -m pytest -q" in ci
    assert "scripts/setup.sh" in README and "scripts/setup.sh" in ci


def test_linked_files_exist():
    import re
    for link in re.findall(r"\]\(((?:docs|bench)/[^)#]+)\)", README):
        assert (ROOT / link).exists(), link
