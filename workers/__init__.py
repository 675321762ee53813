"""The persistent Ray worker pool: rank actors on this machine and remote hosts (imports Ray)."""

from .errors import (InsecureCluster, ModelMissing, NotEnoughDevices, PoolError, PoolUnreachable, VersionSkew,
                     WorkerError, WorkerLost, WorkerStalled, WorkerTimeout)
from .job import Job, JobState
from .pool import WorkerPool, XDiTPool
from .settings import PoolSettings, Timeouts
from .status import HostStatus, PoolStatus, RankStatus

__all__ = ["InsecureCluster", "Job", "JobState", "ModelMissing", "NotEnoughDevices", "PoolError", "PoolSettings",
           "PoolStatus", "PoolUnreachable", "HostStatus", "RankStatus", "Timeouts", "VersionSkew", "WorkerError",
           "WorkerLost", "WorkerPool", "WorkerStalled", "WorkerTimeout", "XDiTPool"]
