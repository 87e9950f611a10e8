"""deploy/setup_gpu.sh: valid bash, installs the `gpu` extra, refuses to run on a machine without a GPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib

from tests.deploy.packing import DEPLOY, ROOT

SCRIPT = DEPLOY / "setup_gpu.sh"


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_installs_the_gpu_extra_with_the_official_vllm():
    text = SCRIPT.read_text()
    assert 'pip install -q -e ".[gpu,test,track]"' in text
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("vllm==") for dep in extras["gpu"])


def test_stops_before_installing_anything_without_nvidia_smi(tmp_path):
    # A PATH holding only the tools the script needs before its GPU check (no nvidia-smi).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "bash"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    venv = tmp_path / "venv"
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30,
                         env={"PATH": str(bin_dir), "VENV": str(venv), "HOME": os.environ.get("HOME", "/tmp")})
    assert out.returncode == 1
    assert "nvidia-smi not found" in out.stderr and "deploy/setup.sh" in out.stderr
    assert not venv.exists()  # nothing was created
