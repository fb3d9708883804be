from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from engine import ManualClock, Store, StoreConfig
from engine.config import KEEP_ALL
from engine.testing import page, page_owner  # noqa: F401  (re-exported for tests)
from engine.testing.faultfs import FaultFileSystem

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile(
    "ci", deadline=None, max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# A small configuration that makes every mechanism (freeze, flush, merge,
# image, log rotation, checkpoint) happen within a few dozen commits.
SMALL = StoreConfig(
    inmemory_layer_bytes=4096,
    log_segment_bytes=8192,
    log_checkpoint_bytes=32768,
    merge_threshold=2,
    delta_target_bytes=64 * 1024,
    image_threshold=2,
    image_partition_keys=4,
    retention=KEEP_ALL,
)

def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """`needs(what)`: skip where the prerequisite is missing; under CI, fail."""
    from .pg import PREREQUISITES

    for mark in item.iter_markers("needs"):
        why = PREREQUISITES[mark.args[0]]()
        if why is not None:
            if in_ci():
                pytest.fail(f"CI runs every test, and this one {why}", pytrace=False)
            pytest.skip(why)


@pytest.fixture
def store_path(tmp_path) -> str:
    return str(tmp_path / "store")


@pytest.fixture
def store(store_path) -> Iterator[Store]:
    s = Store.open(store_path, background=False)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def fault_fs() -> FaultFileSystem:
    return FaultFileSystem(seed=1)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(scope="session")
def seaweedfs():
    """One SeaweedFS S3 server for the session (tests keep apart by prefix)."""
    from .s3servers import SeaweedFS

    with SeaweedFS() as server:
        yield server


@pytest.fixture(scope="session")
def moto():
    """One moto S3 server for the session (tests keep apart by prefix)."""
    from .s3servers import MotoS3

    with MotoS3() as server:
        yield server


@pytest.fixture(params=["seaweedfs", "moto"])
def s3server(request):
    """Each real S3 server in turn."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def ceph():
    """One Ceph RGW for the session (tests keep apart by prefix)."""
    from .s3servers import CephRGW

    with CephRGW() as server:
        yield server


@pytest.fixture(params=["seaweedfs", "moto", pytest.param("ceph", marks=pytest.mark.needs("ceph"))])
def any_s3server(request):
    """Each S3 server in turn, Ceph RGW too (slower: for the short tests)."""
    return request.getfixturevalue(request.param)
