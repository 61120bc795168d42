"""The release: the sdist and wheel build, pass twine check, and the wheel runs alone."""

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.thorough
def test_the_wheel_installs_into_a_fresh_venv_and_checks_its_bundled_example_without_the_source_tree(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--wheel", "--no-isolation", "--outdir", str(dist),
                    str(ROOT)], check=True, capture_output=True, timeout=600)
    twine = subprocess.run([sys.executable, "-m", "twine", "check", *map(str, dist.iterdir())],
                           capture_output=True, text=True, timeout=300, check=False)
    assert twine.returncode == 0 and "PASSED" in twine.stdout, twine.stdout + twine.stderr
    # torch and the other dependencies come from this interpreter's site-packages; verify from the wheel.
    environment = tmp_path / "venv"
    venv.create(environment, system_site_packages=True, with_pip=True)
    python = environment / "bin" / "python"
    wheel = next(dist.glob("*.whl"))
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import verify; print(verify.__file__)"], cwd=elsewhere,
                           capture_output=True, text=True, check=True, timeout=300).stdout
    assert str(environment) in where
    completed = subprocess.run([str(environment / "bin" / "verify"), "check", "--example", "--max-examples", "5"],
                               cwd=elsewhere, capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "claim `grad(o, x) == x`: proved for all n" in completed.stdout
