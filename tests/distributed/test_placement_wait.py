"""On a cluster it joined, the launcher waits for its placement groups instead of refusing what the cluster
does not have yet: a second Ray node (a second raylet on this machine, as Ray's own multi-node tests do)
joins after the request and the groups become ready; with nobody joining, it stops after
run.placement_timeout_s naming what is pending and the knobs."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from coordexp_rl.tools.local_head import RAY, ROOT, local_ray_head, token_env

pytestmark = pytest.mark.integration

# Two rollout actors of 1 CPU + a learner rank of 1 CPU = 3 CPUs; the head has 1.
REQUEST = ["rollout.num_actors=2", "rollout.batch_size=2", "optim.batch_size=2"]
SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
from coordexp_rl.runtime import prepare_runtime
prepare_runtime()
import ray
from coordexp_rl.config import load_config
from coordexp_rl.driver.placement import ResourceError, reserve_resources
ray.init(address=sys.argv[1])
cfg = load_config(None, sys.argv[3:])
try:
    reserve_resources(cfg, local=False, poll_s=float(sys.argv[2]))
    print("READY", flush=True)
except ResourceError as e:
    print("REFUSED", e, flush=True)
"""


def _reserve(gcs: str, env: dict, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, gcs, "1", *REQUEST, *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_the_launcher_waits_for_a_node_that_joins_and_names_what_is_pending_otherwise(tmp_path):
    # a head on 127.0.0.1 refuses other nodes unless this is 1 (Ray reads such a head as a laptop)
    env = token_env(tmp_path, PYTHONPATH=str(ROOT), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1")
    info: dict = {}
    with local_ray_head(env, num_cpus=1, info=info, jobs=False):
        alone = _reserve(info["gcs"], env, "run.placement_timeout_s=3")
        out, _ = alone.communicate(timeout=180)
        assert "REFUSED placement groups not ready after run.placement_timeout_s=3 s" in out, out[-3000:]
        assert "rollout (2 x {1 CPU})" in out and "raise run.placement_timeout_s" in out
        assert "waiting for placement" in out  # progress lines while it waited

        waiting = _reserve(info["gcs"], env, "run.placement_timeout_s=150")
        time.sleep(8)  # the request is pending now
        assert waiting.poll() is None
        joined = subprocess.run([RAY, "start", f"--address={info['gcs']}", "--node-ip-address=127.0.0.1",
                                 "--num-cpus=2", "--disable-usage-stats"], env=env, capture_output=True, text=True,
                                timeout=180)
        assert joined.returncode == 0, joined.stderr[-2000:]
        out, _ = waiting.communicate(timeout=180)
        assert "READY" in out and "ready" in out, out[-3000:]
