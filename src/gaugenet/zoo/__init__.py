"""Model zoos: one task (inspect, canonicalize, certify, equalize) over thousands of
checkpoints, in parallel on Dask, with a resumable Parquet table of results."""

from ._arch import BUILTIN_ARCHS as BUILTIN_ARCHS
from ._cluster import dask_client as dask_client
from ._fingerprint import fingerprint as fingerprint
from ._run import run as run
from ._schema import SCHEMA as SCHEMA
from ._sources import content_hash as content_hash
from ._sources import list_checkpoints as list_checkpoints
from ._task import AbstractTask as AbstractTask
from ._task import Outcome as Outcome
from ._tasks import TASKS as TASKS
from ._tasks import Canonicalize as Canonicalize
from ._tasks import Certify as Certify
from ._tasks import Equalize as Equalize
from ._tasks import Inspect as Inspect
from ._worker import process as process
