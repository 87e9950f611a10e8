"""docs/DEPLOY.md names only files that exist and configs that load, so the guide cannot drift silently."""

from __future__ import annotations

import re
import shlex

from coordexp_rl.config import load_config
from tests.deploy.packing import ROOT

DOC = (ROOT / "docs" / "DEPLOY.md").read_text()


def test_every_repo_path_in_the_guide_exists():
    paths = set(re.findall(r"\b((?:configs|deploy|docs|tests/deploy)/[\w./-]+\.(?:yaml|json|sh|md|py))", DOC))
    assert "deploy/ray_cluster.yaml" in paths and "deploy/kuberay/rayjob.yaml" in paths
    missing = sorted(p for p in paths if not (ROOT / p).is_file())
    assert missing == []


def test_every_launch_command_in_the_guide_resolves():
    # Join continued shell lines, then load each `coordexp_rl.launch --config X k=v ...` as the driver would.
    blocks = re.findall(r"```bash\n(.*?)```", DOC, flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    commands = [line for line in lines if "coordexp_rl.launch --config" in line]
    assert len(commands) >= 5
    for line in commands:
        argv = shlex.split(line.split("coordexp_rl.launch", 1)[1].split("|")[0])
        path = argv[argv.index("--config") + 1]
        overrides = [a for a in argv if "=" in a and not a.startswith("-") and "." in a.split("=")[0]]
        load_config(ROOT / path, overrides)  # raises ConfigError on a bad path or key


def test_guide_documents_the_auth_choice():
    for needle in ("RAY_AUTH_MODE=token", "Missing authentication", "--dashboard-host=127.0.0.1",
                   "ray get-auth-token --generate", "run.resume=", "ray job logs", "tb/"):
        assert needle in DOC, needle
