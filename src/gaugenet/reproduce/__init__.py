"""The reproduction report: every implemented claim of the paper, measured."""

from ._registry import Claim as Claim
from ._registry import Context as Context
from ._registry import Measurement as Measurement
from ._registry import all_claims as all_claims
from ._registry import claim as claim
from ._report import Outcome as Outcome
from ._report import run_claims as run_claims
from ._report import write_report as write_report
