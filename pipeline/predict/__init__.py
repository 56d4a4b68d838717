"""A trained model on a person's own clips: a support folder or saved index, query clips and long
recordings in windows, probabilities calibrated on the support, and unknown below a threshold.
"""

from pipeline.predict.clips import PROTO, PredictError, find_videos
from pipeline.predict.outputs import merge_segments, timeline_figure, write_csv
from pipeline.predict.recognizer import FewShotRecognizer, UnknownRule, parse_unknown
from pipeline.predict.support import SupportSet

__all__ = [
    "FewShotRecognizer",
    "PROTO",
    "PredictError",
    "SupportSet",
    "UnknownRule",
    "find_videos",
    "merge_segments",
    "parse_unknown",
    "timeline_figure",
    "write_csv",
]
