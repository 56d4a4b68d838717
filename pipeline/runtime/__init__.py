"""Where work runs: the device and precision chosen once ("auto"), torch.distributed ranks and
collectives, and crash-isolated worker processes with their time limit.
"""

from pipeline.runtime.distributed import (
    DeviceError,
    autocast_dtype,
    init_distributed,
    resolve_device,
    resolve_precision,
    teardown,
)
from pipeline.runtime.workers import imap_isolated

__all__ = [
    "DeviceError",
    "autocast_dtype",
    "imap_isolated",
    "init_distributed",
    "resolve_device",
    "resolve_precision",
    "teardown",
]
