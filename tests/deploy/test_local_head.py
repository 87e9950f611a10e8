"""The local Ray head's teardown ends its own processes (found by temp dir or GCS port) and their children,
not a neighbour's."""

import subprocess
import sys
import time

import psutil

from coordexp_rl.tools.local_head import _cluster_processes

# A process that starts one child, as the raylet starts the renamed ray:: workers.
PARENT = [sys.executable, "-c", "import subprocess, sys, time; "
          "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"]


def _children(proc: subprocess.Popen, timeout_s: float = 20.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while not (kids := psutil.Process(proc.pid).children()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return kids


def test_teardown_finds_the_heads_processes_and_their_children_only(tmp_path):
    head_dir, port = tmp_path / "ray_head", 4512
    procs = {
        "by_port": subprocess.Popen([*PARENT, f"--address=127.0.0.1:{port}"]),
        "by_dir": subprocess.Popen([*PARENT, f"--temp-dir={head_dir}/session"]),
        "longer_port": subprocess.Popen([*PARENT, f"--address=127.0.0.1:{port}0"]),  # another cluster's 45120
        "other_dir": subprocess.Popen([*PARENT, f"--temp-dir={tmp_path}/other"]),
    }
    try:
        children = {name: _children(proc) for name, proc in procs.items()}
        found = {p.pid for p in _cluster_processes(head_dir, port)}
        for name, proc in procs.items():
            mine = name in ("by_port", "by_dir")
            assert (proc.pid in found) is mine, name
            assert children[name] and all((c.pid in found) is mine for c in children[name]), name
    finally:
        for proc in procs.values():
            for child in psutil.Process(proc.pid).children():
                child.kill()
            proc.kill()
