"""platform/ is a source root, never a package that shadows the stdlib's `platform`."""

import subprocess
import sys

from conftest import REPO


def test_platform_dir_has_no_init():
    assert not (REPO / "platform" / "__init__.py").exists()


def test_stdlib_platform_still_works_from_repo_root():
    # cwd is the repo root, so '' (the cwd) is first on sys.path, exactly where a stray
    # platform/__init__.py would shadow the standard library module.
    code = "import platform, torch; print(platform.system()); print(platform.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    system, path = out.stdout.split()
    import platform

    assert system == platform.system() != ""
    assert path.endswith("platform.py") and "platform/kiln" not in path
    assert not path.startswith(str(REPO / "platform"))


def test_kiln_imports_from_platform_source_root():
    from pathlib import Path

    import kiln

    assert Path(kiln.__file__).resolve() == (REPO / "platform" / "kiln" / "__init__.py").resolve()
