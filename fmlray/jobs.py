"""What differs for a run started by `ray job submit` (KubeRay's RayJob submits one too)."""

from __future__ import annotations

import os
from pathlib import Path

from fmlray.errors import ConfigError

# Ray's job supervisor hands the driver its job config (runtime env, metadata) in this variable.
JOB_DRIVER_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def in_ray_job() -> bool:
    """Whether this process is the driver of a Ray job."""
    return JOB_DRIVER_VAR in os.environ


def check_path(path: str | os.PathLike, what: str) -> None:
    """Refuse a relative path in a Ray job: it would resolve inside the job's working directory, a
    temporary copy that Ray deletes, while the run reports it as written."""
    if in_ray_job() and not Path(path).is_absolute():
        raise ConfigError(f"{what}={str(path)!r} is relative, but this is a Ray job: it would resolve inside the "
                          f"job's temporary working directory ({os.getcwd()}), which Ray deletes; give an absolute "
                          "path on the head node or on shared storage")
