"""What a live stream writes: one JSON line per window, the segments it closes, and a summary line however
the stream ends, each line flushed at once so a reader tailing the file sees it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, TextIO

from pipeline.predict.annotate import LiveAnnotation
from pipeline.predict.recognizer import FewShotRecognizer
from pipeline.predict.stream import LiveStream, StreamLost, StreamWindow


def open_lines(path: Path | None) -> AbstractContextManager[TextIO]:
    """The JSON lines' file, its folder made (replacing an earlier one), or stdout (left open) without a path."""
    if path is None:
        return nullcontext(sys.stdout)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("w")


def write_line(out: TextIO, record: dict[str, Any]) -> None:
    """One JSON object on one line, flushed."""
    out.write(json.dumps(record) + "\n")
    out.flush()


def write_lines(
    live: LiveStream, out: TextIO, on_window: Callable[[StreamWindow], None] | None = None
) -> StreamLost | None:
    """Each window as it is classified and the segments it closes, then the segments the end closes and a
    summary line, however the stream ends: its end, Ctrl-C (KeyboardInterrupt, a clean stop), a lost
    source (returned, for the caller to say) or any other error (raised after the summary)."""
    lost = None
    try:
        for window in live:
            write_line(out, window.record)
            for segment in window.segments:
                write_line(out, {"kind": "segment", **segment})
            if on_window is not None:
                on_window(window)
    except KeyboardInterrupt:
        pass
    except StreamLost as err:
        lost = err
    finally:
        for segment in live.close():
            write_line(out, {"kind": "segment", **segment})
        write_line(out, {"kind": "summary", **live.summary()})
    return lost


def run_stream(
    recognizer: FewShotRecognizer,
    source: str,
    jsonl: Path | None,
    *,
    annotate: Path | None = None,
    tell: Callable[[str], None] | None = None,
    **options: Any,
) -> tuple[LiveStream, StreamLost | None, Path | None]:
    """`strm predict --stream`: the source's windows as JSON lines to `jsonl` (stdout without), its annotated
    copy to `annotate`; (the stream, for its summary; the loss that ended it, if one did; the annotated file).
    `tell` hears notices (reconnects, skipped windows); `options` are FewShotRecognizer.stream's."""
    assert recognizer.support is not None  # add_support comes first
    video = LiveAnnotation(annotate, recognizer.support.actions, top_k=options.get("top_k", 3)) if annotate else None
    live = recognizer.stream(source, on_notice=tell, on_frame=video.on_frame if video else None, **options)
    with open_lines(jsonl) as out:
        lost = write_lines(live, out, video.on_window if video else None)
    return live, lost, video.close() if video else None
