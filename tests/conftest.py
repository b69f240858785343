import os
import shutil

import pytest
import torch
from serve_fixtures import bundle, runs  # noqa: F401 - session fixtures of the serving tests

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Programs from system packages that some tests need -> the Debian package that provides them
# (scripts/install_system_deps.sh installs them; `make install` runs it). A test that needs one
# says so with `@pytest.mark.requires_binary("espeak-ng")` (or a module `pytestmark`), or, in a
# fixture, by calling the `require_binary` fixture's function; it is then skipped with a reason
# naming the package when the program is missing.
SYSTEM_PACKAGES = {
    "espeak-ng": "espeak-ng",
    "sox": "sox",
    "chromium": "chromium",
    "chromedriver": "chromium-driver",
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "sbatch": "slurm-client",
    "srun": "slurm-client",
    "sinfo": "slurm-client",
    "scontrol": "slurm-client",
    "munged": "munge",
}
_SBIN = os.pathsep.join(("/usr/local/sbin", "/usr/sbin", "/sbin"))


def find_binary(name: str) -> str | None:
    """The program's path on PATH, or in the sbin folders (daemons; not on a user's PATH)."""
    return shutil.which(name) or shutil.which(name, path=_SBIN)


def missing_binaries_reason(*names: str) -> str | None:
    """None when every program is there, else a skip reason naming the missing packages."""
    missing = [n for n in names if find_binary(n) is None]
    if not missing:
        return None
    pkgs = " ".join(dict.fromkeys(SYSTEM_PACKAGES.get(n, n) for n in missing))
    several = " " in pkgs
    return (
        f"needs the system package{'s' if several else ''} {pkgs} (missing: {', '.join(missing)}; "
        f"`make install` as root installs {'them' if several else 'it'}, or apt-get install {pkgs})"
    )


def _require_binary(*names: str) -> None:
    reason = missing_binaries_reason(*names)
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def require_binary():
    """For fixtures: `require_binary("espeak-ng")` skips the requesting tests without it."""
    return _require_binary


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "requires_binary(*names): needs these programs from system packages; skipped, naming the package, without them",
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = [n for m in item.iter_markers("requires_binary") for n in m.args]
        reason = missing_binaries_reason(*names) if names else None
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_cfg():
    from aion_train.config import load_config

    return load_config("configs/tiny_cpu.yaml", ["model.n_layers=2"])


_LAUNCHER_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def _no_launcher_env_leaks():
    """A test that runs a phase in-process (world size 1) sets MASTER_PORT etc. and keeps that
    port bound; a later test's subprocesses must not inherit it (EADDRINUSE)."""
    before = {k: os.environ.get(k) for k in _LAUNCHER_VARS}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
