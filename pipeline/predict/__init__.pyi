from .clips import PROTO, PredictError, find_videos, scan_videos
from .outputs import csv_rows, merge_segments, table_rows, timeline_figure, unused_path, write_csv
from .recognizer import FewShotRecognizer, UnknownRule, parse_unknown
from .stream import LiveStream, StreamLost, StreamWindow
from .stream_lines import open_lines, write_lines
from .support import HeldOut, SupportSet

__all__ = [
    "FewShotRecognizer",
    "HeldOut",
    "LiveStream",
    "PROTO",
    "PredictError",
    "StreamLost",
    "StreamWindow",
    "SupportSet",
    "UnknownRule",
    "csv_rows",
    "find_videos",
    "merge_segments",
    "open_lines",
    "parse_unknown",
    "scan_videos",
    "table_rows",
    "timeline_figure",
    "unused_path",
    "write_csv",
    "write_lines",
]
