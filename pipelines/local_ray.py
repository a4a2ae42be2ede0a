"""Starting a local Ray that listens on the loopback interface only.

    from pipelines import local_ray
    local_ray.prepare()                      # before Ray is imported, where that can be arranged
    local_ray.start(num_cpus=2, include_dashboard=False)

Ray gives its gRPC servers (GCS, raylet, every worker including the driver) a wildcard address and its agents the
node's address unless the node's address is the loopback one; and ``ray.init`` turns a loopback
``_node_ip_address`` back into the machine's address, except where Ray treats the machine as one that cannot join
clusters (Ray's ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` switch, read in ``ray._private.services.get_node_ip_address``).
``start`` turns that switch off while Ray starts, so the node's address is 127.0.0.1 and every server binds
loopback; the dashboard, when on, is given 127.0.0.1 too. A local Ray never takes other nodes, so nothing is lost.
Connecting to a cluster (an address, ``RAY_ADDRESS``) does not come here.

Ray starts its workers at niceness 15, below its own services (GCS, raylet, dashboard, agents) and the driver, all
at 0: on a machine of a few cores every wakeup of a service, or of anything else the user runs, preempts the
training or decoding threads. A local Ray runs its workers at the driver's niceness (Ray's ``RAY_worker_niceness``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

# Ray's switch: false makes get_node_ip_address answer the loopback address (it is read when Ray is imported)
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK = "127.0.0.1"
WORKER_NICENESS_ENV = "RAY_worker_niceness"  # read by the raylet when it starts


def is_local(address: str | None) -> bool:
    """Whether ``ray.init(address)`` would start a new local Ray rather than join a cluster."""
    return not address and not os.environ.get("RAY_ADDRESS")


def prepare() -> None:
    """Settings Ray reads when it is imported, for a local Ray: token authentication said explicitly (Ray's
    default; set after the import, the local servers would ask for a token this driver does not send)."""
    if "ray" not in sys.modules:
        os.environ.setdefault("RAY_AUTH_MODE", "token")


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """``name=value`` in this process's environment for the ``with`` block (Ray's processes inherit it)."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


@contextlib.contextmanager
def _loopback_node_address() -> Iterator[None]:
    # The switch is an environment variable read into a module constant at import: both are set for the start
    # (the constant because Ray may already be imported) and put back after, so a later ray.init(address=...)
    # in this process gets the machine's address as usual. Ray's processes are given the address as arguments.
    from ray._private import ray_constants

    saved_const = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with _env(SINGLE_MACHINE_ENV, "0"):
            yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_const


def start(**init_args: Any) -> Any:
    """``ray.init(**init_args)`` for a new local Ray whose every server listens on 127.0.0.1 only."""
    prepare()
    import ray

    if init_args.get("address") or os.environ.get("RAY_ADDRESS"):
        raise ValueError("local_ray.start starts a local Ray; use ray.init(address=...) to join a cluster")
    if init_args.get("include_dashboard") is not False:
        init_args.setdefault("dashboard_host", LOOPBACK)
    # One machine is never preempted; Ray Train's preemption watcher would only log an error at start-up.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    niceness = os.environ.get(WORKER_NICENESS_ENV, str(os.getpriority(os.PRIO_PROCESS, 0)))
    with _loopback_node_address(), _env(WORKER_NICENESS_ENV, niceness):
        return ray.init(**init_args)
