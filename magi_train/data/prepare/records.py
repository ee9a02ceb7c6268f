"""The records the preparation steps hand each other: the errors, the skip reasons and a clip's outcome.

Every other module of the package imports this one and it imports none of them, so the steps stay layered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Skip reasons, as the summary groups them.
MISSING_FILE = "missing file"
DUPLICATE = "duplicate input"
MISSING_CAPTION = "missing caption"
UNDECODABLE = "undecodable"
TOO_SHORT = "too short"
ENCODE_FAILED = "encode failed"
WORKER_DIED = "worker died"


class InputListError(ValueError):
    """A malformed input list; the message names the file and line."""


class PrepareError(RuntimeError):
    """A setting or an output folder that does not allow the run to start (or continue)."""


class SkipClip(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Encoded:
    source: str
    key: str
    members: dict[str, Any]  # encode_sample's dict: what the tar gets


@dataclass(frozen=True)
class Skipped:
    source: str
    reason: str
    detail: str


Result = Encoded | Skipped
