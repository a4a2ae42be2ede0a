"""A local Ray started the way curation and training start it listens on the loopback interface only: every
listening socket of every Ray process (GCS, raylet, dashboard and its agents, workers, the driver). Its workers run
at the driver's niceness, not below Ray's own services."""

from __future__ import annotations

import ipaddress
import os
import socket

import psutil

from pipelines.curation import job as curate


def _listening(pids: set[int]) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket listening, or UDP socket bound, in these processes."""
    found = []
    for c in psutil.net_connections(kind="inet"):
        if c.pid not in pids or not c.laddr:
            continue
        if c.type == socket.SOCK_STREAM and c.status != psutil.CONN_LISTEN:
            continue
        try:
            proc = psutil.Process(c.pid)
            name = "dashboard" if any(a.endswith("dashboard/dashboard.py") for a in proc.cmdline()) else proc.name()
        except psutil.NoSuchProcess:
            continue
        found.append((name, c.laddr.ip, c.laddr.port))
    return found


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:127.0.0.1, an IPv6 socket bound to the IPv4 loopback address
    return addr.is_loopback


def test_local_ray_listens_on_loopback_only(own_ray):
    import ray

    curate.init_ray(None, num_cpus=2, task_cpus=0.5)  # with the dashboard, as curate and train start it
    # workers, Ray Data's actors and the dashboard's agents all open servers: make them start
    assert ray.data.range(64, override_num_blocks=4).map_batches(lambda b: b).count() == 64
    me = psutil.Process()
    pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
    sockets = _listening(pids)
    names = {name for name, _, _ in sockets}
    # the test sees Ray's servers (not an empty list): the GCS, the raylet, the dashboard, workers
    assert {"gcs_server", "raylet", "dashboard"} <= names and any(n.startswith("ray::") for n in names), sockets
    exposed = [s for s in sockets if not _is_loopback(s[1])]
    assert not exposed, f"Ray sockets reachable from other machines: {exposed}"


def test_local_ray_workers_run_at_the_drivers_niceness(ray_session):
    import ray

    @ray.remote(num_cpus=1)
    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, 0)

    # Ray's default is 15: every wakeup of the GCS, raylet or dashboard would preempt a training worker
    assert ray.get(niceness.remote()) == os.getpriority(os.PRIO_PROCESS, 0)
