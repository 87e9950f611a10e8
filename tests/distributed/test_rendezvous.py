"""Every rendezvous listener binds the address the ranks are told (issue 31): torch's own TCPStore server
listens on all interfaces (``*:port``) whatever host it is given; ours listens on 127.0.0.1 on one machine.
Read from /proc/net/tcp{,6} (the CI and the clusters run Linux)."""

import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from coordexp_rl.rollout.rendezvous import tcp_store
from coordexp_rl.rollout.weight_transport import init_weight_group
from learner.distributed import free_port

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")


def listening_addresses(port: int) -> set[str]:
    """The local addresses (hex, as /proc writes them) of the TCP listeners on ``port``, IPv4 and IPv6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                found.add(address)
    return found


LOOPBACK = "0100007F"  # 127.0.0.1, little-endian hex


def test_torch_store_alone_listens_everywhere():
    """The reason for rendezvous.py, kept as a check that this test's reading of /proc can see it."""
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, 1, True, timeout=timedelta(seconds=5), wait_for_workers=False)
    assert listening_addresses(port) and LOOPBACK not in listening_addresses(port)
    del store


def test_store_listens_on_the_given_address_only_and_serves_the_other_ranks():
    port = free_port()
    server = tcp_store("127.0.0.1", port, 2, 0, timedelta(seconds=10))
    assert listening_addresses(port) == {LOOPBACK}
    client = tcp_store("127.0.0.1", port, 2, 1, timedelta(seconds=10))
    client.set("k", "v")
    assert server.get("k") == b"v"


def test_weight_group_listens_on_loopback():
    port = free_port()
    group = init_weight_group("127.0.0.1", port, 0, 1, "gloo", timeout_s=10)
    assert listening_addresses(port) == {LOOPBACK}
    del group


def test_learner_group_listens_on_loopback():
    """In a fresh process: the learner's default group is process-wide."""
    port = free_port()
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parents[2])!r})\n"
            "from learner.distributed import init_process_group\n"
            "from tests.distributed.test_rendezvous import listening_addresses\n"
            f"init_process_group(0, 1, '127.0.0.1', {port}, use_cuda=False, timeout_s=30)\n"
            f"print(sorted(listening_addresses({port})))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == f"['{LOOPBACK}']"


def test_free_port_is_bindable_and_outside_the_ephemeral_range():
    """Outgoing connections take ephemeral ports at any moment; a rendezvous port picked there can be gone
    by the time rank 0 binds it (EADDRINUSE at a learner re-form, once in CI)."""
    from learner.distributed import ephemeral_ports

    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1  # random, not one fixed port for every caller
    for port in ports:
        assert port not in ephemeral_ports()
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free
