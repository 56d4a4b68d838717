from .distributed import (
    COLLECTIVE_TIMEOUT,
    DeviceError,
    autocast_dtype,
    init_distributed,
    resolve_device,
    resolve_precision,
    teardown,
)
from .files import replace_durably, sync_dir, sync_file
from .workers import TIME_LIMIT_S, imap_isolated

__all__ = [
    "COLLECTIVE_TIMEOUT",
    "TIME_LIMIT_S",
    "DeviceError",
    "autocast_dtype",
    "imap_isolated",
    "init_distributed",
    "replace_durably",
    "resolve_device",
    "resolve_precision",
    "sync_dir",
    "sync_file",
    "teardown",
]
