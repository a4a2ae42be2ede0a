"""The integration tier: Ray, DeepSpeed, MLflow stores and servers, Prefect, jobs run end to end.

Tests that use Ray share one local Ray for the session (``ray_session``): starting one takes 10-15 s on the CI
machine. A test that starts and stops Ray itself asks for ``own_ray``, which stops the shared one first and starts it
again afterwards. The job-submission tests run a private Ray head in another process; it does not touch this one.
"""

from __future__ import annotations

import os

import pytest
import torch


def _start_ray() -> None:
    import ray

    from pipelines import local_ray

    if not ray.is_initialized():
        # T2V_TEST_RAY_LOGS=1 shows the workers' output (training steps, Ray Data progress) when debugging
        local_ray.start(num_cpus=2, include_dashboard=False, log_to_driver=bool(os.environ.get("T2V_TEST_RAY_LOGS")))


@pytest.fixture(scope="session")
def ray_session():
    """The session's local Ray (2 CPUs, no dashboard). Library code finds it and does not start or stop its own."""
    import ray

    _start_ray()
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(autouse=True)
def _shared_ray_is_up(request):
    # a test that stopped Ray (library code stops a Ray it started) must not leave the next one without it
    if "ray_session" in request.fixturenames:
        _start_ray()


@pytest.fixture
def own_ray():
    """For a test that calls ray.init/ray.shutdown itself: no Ray is running when it starts; the shared one (if
    it was running) comes back afterwards."""
    import ray

    shared = ray.is_initialized()
    if shared:
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()
    if shared:
        _start_ray()


class _PooledVideoNet(torch.nn.Module):
    """Stand-in for an I3D feature network (none can be downloaded here): pooled colour statistics, projected."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, 3, f, h, w] -> [b, 4], any clip size
        return self.proj(torch.cat([x.mean(dim=(2, 3, 4)), x.amax(dim=(2, 3, 4))], dim=1))


@pytest.fixture(scope="session")
def fvd_network(tmp_path_factory):
    """A TorchScript video network file for FVD (``fvd_network`` of the evaluation configs)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fvdnet") / "video_net.pt"
    torch.jit.save(torch.jit.trace(_PooledVideoNet(), torch.zeros(1, 3, 8, 32, 32)), str(path))
    return path
