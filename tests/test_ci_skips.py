"""Under CI=true a skip fails the run unless tests/ci_skips.py lists it with its reason."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import ci_skips

HERE = Path(__file__).parent


def run(tmp_path: Path, files: dict[str, str], ci: bool) -> subprocess.CompletedProcess[str]:
    tests = tmp_path / "tests"
    tests.mkdir(exist_ok=True)
    shutil.copy(HERE / "ci_skips.py", tests / "ci_skips.py")
    (tests / "conftest.py").write_text(
        "from ci_skips import pytest_collectreport, pytest_runtest_logreport, pytest_sessionfinish, "
        "pytest_terminal_summary  # noqa: F401\n")
    for name, body in files.items():
        (tests / name).write_text(body)
    env = {**os.environ, "CI": "true" if ci else "false"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)


def test_unlisted_skips_fail_only_under_ci_and_the_listed_one_is_tolerated(tmp_path: Path) -> None:
    reason = ci_skips.ALLOWED["tests/test_playground.py"][0]
    listed = {"test_playground.py": f"import pytest\n\ndef test_page():\n    pytest.skip({reason!r})\n",
              "test_ok.py": "def test_ok():\n    pass\n"}
    unlisted = {
        "test_x.py": "import pytest\n\ndef test_skipped():\n    pytest.skip('no gpu')\n",
        "test_y.py": "import pytest\npytest.skip('no extra', allow_module_level=True)\n",
    }
    assert run(tmp_path, listed, ci=True).returncode == 0
    assert run(tmp_path, unlisted, ci=False).returncode == 0
    failed = run(tmp_path, unlisted, ci=True)
    assert failed.returncode == 1, failed.stdout
    summary = failed.stdout.split("skips not allowed under CI=true")[1]
    assert "tests/test_x.py::test_skipped: Skipped: no gpu" in summary
    assert "tests/test_y.py: Skipped: no extra" in summary  # a module-level skip counts too
    assert "test_playground" not in summary


def test_ci_run_prints_the_list() -> None:
    out = subprocess.run([sys.executable, str(HERE / "ci_skips.py")], capture_output=True, text=True, check=True).stdout
    assert "tests/test_playground.py" in out
    assert "python tests/ci_skips.py" in (HERE.parent / ".ci" / "run").read_text()
