"""A trained model on a person's own clips: a support folder or saved index, query clips and long
recordings in windows, live streams as they play, probabilities calibrated on the support, and unknown
below a threshold.
"""

from pipeline.predict.clips import PROTO, PredictError, find_videos, scan_videos
from pipeline.predict.outputs import csv_rows, merge_segments, table_rows, timeline_figure, unused_path, write_csv
from pipeline.predict.recognizer import FewShotRecognizer, UnknownRule, parse_unknown
from pipeline.predict.stream import LiveStream, StreamLost, StreamWindow
from pipeline.predict.stream_lines import open_lines, write_lines
from pipeline.predict.support import HeldOut, SupportSet

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
