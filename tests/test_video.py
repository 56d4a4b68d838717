"""The sampling rule, decoding and views, checked on real H.264 / MPEG-4 files whose frames carry their index."""

from __future__ import annotations

import hashlib
import sys
import warnings

import numpy as np
import pytest
import torch
from vfr_video import VFR_TIMES, write_vfr_video
from video_factory import read_index, write_test_video

from pipeline.data import video
from pipeline.data.video import (
    SAMPLING_RULE_VERSION,
    ShortVideo,
    VideoError,
    ViewSpec,
    count_frames,
    crop_view,
    decode_frames,
    frame_rate,
    frame_times,
    load_view,
    load_views,
    load_window,
    sample_indices,
    transform_view,
    view_rng,
)
from pipeline.runtime.workers import imap_isolated

# Test-view indices worked out by hand from STRM_SPEC section 10:
# n < 11 -> int(linspace(0, n-1, 8)); otherwise int(linspace(1, n-2, 8)).
TEST_INDICES = {
    8: [0, 1, 2, 3, 4, 5, 6, 7],
    9: [0, 1, 2, 3, 4, 5, 6, 8],  # step 8/7
    10: [0, 1, 2, 3, 5, 6, 7, 9],  # step 9/7
    11: [1, 2, 3, 4, 5, 6, 7, 9],  # (n-2)-1 = 8: no fallback; step 8/7 from 1
    40: [1, 6, 11, 16, 22, 27, 32, 38],  # step 37/7
    300: [1, 43, 85, 128, 170, 213, 255, 298],  # step 297/7
}
CODECS = {"h264": ".mp4", "mpeg4": ".avi"}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """One file per (codec, n) of TEST_INDICES, written once for the module."""
    root = tmp_path_factory.mktemp("videos")
    return {
        (codec, n): write_test_video(root / f"{codec}_{n}{suffix}", n, codec=codec)
        for codec, suffix in CODECS.items()
        for n in TEST_INDICES
    }


@pytest.fixture
def decoder(monkeypatch, request):
    """Run a test once per decoder: torchcodec and the PyAV fallback."""
    monkeypatch.setenv(video.DECODER_ENV, request.param)
    return request.param


def indices_of(frames: torch.Tensor) -> list[int]:
    return [read_index(frame) for frame in frames]


# --- the rule -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", sorted(TEST_INDICES))
def test_test_view_indices_follow_the_spec(n):
    assert sample_indices(n) == TEST_INDICES[n]


class FixedDraws:
    """Stands in for a Generator: returns the given start/end draws and records the ranges asked."""

    def __init__(self, *draws: int) -> None:
        self.draws, self.ranges = list(draws), []

    def integers(self, low, high, endpoint=False):
        self.ranges.append((low, high, endpoint))
        return self.draws.pop(0)


def test_train_jitter_draws_start_then_end_within_pad():
    rng = FixedDraws(3, 36)
    # n = 40: pad = int(min(5, 16)) = 5; start in [0, 5], end in [34, 39]; linspace(3, 36, 8) by hand.
    assert sample_indices(40, train=True, rng=rng) == [3, 7, 12, 17, 21, 26, 31, 36]
    assert rng.ranges == [(0, 5, True), (34, 39, True)]


def test_train_falls_back_to_whole_video_when_the_window_is_short():
    # n = 10: pad = 1; start 1, end 8 -> end - start = 7 < 8 -> linspace(0, 9, 8).
    assert sample_indices(10, train=True, rng=FixedDraws(1, 8)) == TEST_INDICES[10]
    # n = 9: pad = int(0.5) = 0 -> no draws at all, 0..8.
    rng = FixedDraws()
    assert sample_indices(9, train=True, rng=rng) == TEST_INDICES[9] and rng.ranges == []
    assert sample_indices(8, train=True, rng=FixedDraws()) == list(range(8))


def test_train_jitter_covers_its_range():
    starts, ends = set(), set()
    for seed in range(200):
        indices = sample_indices(300, train=True, rng=np.random.default_rng(seed))
        assert len(indices) == 8 and indices == sorted(indices)
        starts.add(indices[0])
        ends.add(indices[-1])
    assert starts == set(range(0, 6)) and ends == set(range(294, 300))


def test_short_videos_are_refused_unless_repeated():
    with pytest.raises(ShortVideo, match="at least 8 frames"):
        sample_indices(7)
    assert sample_indices(5, repeat_short=True) == [0, 0, 1, 1, 2, 2, 3, 4]  # int(linspace(0, 4, 8))
    assert sample_indices(7, repeat_short=True) == [0, 0, 1, 2, 3, 4, 5, 6]
    assert sample_indices(1, repeat_short=True) == [0] * 8
    with pytest.raises(ValueError, match="no decodable frame"):
        sample_indices(0, repeat_short=True)
    with pytest.raises(ValueError, match="rng"):
        sample_indices(40, train=True)
    # A worker's reason text gives the count back (the class name is its prefix there); nothing else does.
    assert ShortVideo.frames_in(f"ShortVideo: {ShortVideo(7)}") == 7
    assert ShortVideo.frames_in("VideoError: x.mp4: no such file") is None


def test_repeats_leave_videos_of_8_frames_or_more_exactly_as_they_were():
    """The benchmarks and every cache depend on it: repeat_short changes nothing from 8 frames on, for the
    test view and for every training view (same draws from the same generator)."""
    for n in range(8, 400):
        assert sample_indices(n, repeat_short=True) == sample_indices(n)
        for view in (1, 2):
            a, b = view_rng(0, f"c/{n}", view), view_rng(0, f"c/{n}", view)
            assert sample_indices(n, True, a, repeat_short=True) == sample_indices(n, True, b)
    assert [sample_indices(n, repeat_short=True) for n in sorted(TEST_INDICES)] == [
        TEST_INDICES[n] for n in sorted(TEST_INDICES)
    ]


def test_view_rng_separates_seed_video_and_view():
    draw = lambda seed, vid, view: view_rng(seed, vid, view).integers(0, 2**62)  # noqa: E731
    assert draw(7, "a", 1) == draw(7, "a", 1)
    assert len({draw(7, "a", 1), draw(7, "a", 2), draw(8, "a", 1), draw(7, "b", 1), draw(7, "a", 0)}) == 5


# --- decoding real files ----------------------------------------------------------------------


@pytest.mark.parametrize("decoder", ["torchcodec", "pyav"], indirect=True)
@pytest.mark.parametrize("codec", sorted(CODECS))
def test_exact_frames_for_every_length(videos, codec, decoder):
    for n, expected in TEST_INDICES.items():
        path = videos[codec, n]
        assert count_frames(path) == n
        frames = decode_frames(path, sample_indices(n))
        assert frames.dtype == torch.uint8 and frames.shape == (8, 3, 48, 64)
        assert indices_of(frames) == expected, (codec, n)


@pytest.mark.parametrize("decoder", ["torchcodec", "pyav"], indirect=True)
def test_frames_come_in_the_order_asked_with_repeats(videos, decoder):
    frames = decode_frames(videos["h264", 300], [250, 3, 120, 3, 299, 0])
    assert indices_of(frames) == [250, 3, 120, 3, 299, 0]


def test_both_decoders_give_the_same_pixels(videos, monkeypatch):
    out = {}
    for name in ("torchcodec", "pyav"):
        monkeypatch.setenv(video.DECODER_ENV, name)
        out[name] = decode_frames(videos["h264", 40], [0, 17, 39])
    assert torch.equal(out["torchcodec"], out["pyav"])


@pytest.mark.parametrize("decoder", ["torchcodec", "pyav"], indirect=True)
def test_paths_with_spaces_and_unicode(tmp_path, decoder):
    path = write_test_video(tmp_path / "a folder with spaces" / "vidéo ñ 日本 (1).mp4", 12)
    assert count_frames(path) == 12
    assert indices_of(decode_frames(path, sample_indices(12))) == sample_indices(12)


def test_index_past_the_end_names_the_file(videos):
    path = videos["mpeg4", 40]
    with pytest.raises(VideoError, match=r"mpeg4_40\.avi: frame 40 asked"):
        decode_frames(path, [0, 40])


@pytest.mark.parametrize("decoder", ["torchcodec", "pyav"], indirect=True)
def test_bad_files_raise_video_error_with_the_reason(tmp_path, decoder):
    cases = {
        "missing.mp4": "no such file",
        "zero.mp4": "empty file",
        "text.mp4": "cannot open",
        "folder.mp4": "not a file",
        "cut.mp4": "cannot open",  # moov index at the end, cut off
    }
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("not a video at all\n" * 50)
    (tmp_path / "folder.mp4").mkdir()
    whole = write_test_video(tmp_path / "whole.mp4", 40).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(whole[: len(whole) // 2])
    for name, reason in cases.items():
        path = tmp_path / name
        for call in (lambda path=path: count_frames(path), lambda path=path: decode_frames(path, [0])):
            with pytest.raises(VideoError) as caught:
                call()
            assert str(caught.value).startswith(f"{path}: {reason}"), str(caught.value)
            assert caught.value.path == str(path)


@pytest.mark.parametrize("decoder", ["torchcodec", "pyav"], indirect=True)
@pytest.mark.parametrize("codec,suffix,faststart", [("h264", ".mp4", True), ("mpeg4", ".avi", False)])
def test_truncated_container_that_over_reports(tmp_path, decoder, codec, suffix, faststart):
    """The header still says 100 frames; count the ones that exist and decode only those."""
    import av

    whole = write_test_video(tmp_path / f"whole{suffix}", 100, codec=codec, faststart=faststart)
    path = tmp_path / f"cut{suffix}"
    data = whole.read_bytes()
    path.write_bytes(data[: len(data) * 7 // 10])
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 100  # the header over-reports
    n = count_frames(path)
    assert 8 <= n < 100
    indices = sample_indices(n)
    assert indices_of(decode_frames(path, indices)) == indices
    with pytest.raises(VideoError, match="frame 99 asked"):
        decode_frames(path, [99])


def test_decoders_agree_on_the_true_count_of_a_cut_file(tmp_path, monkeypatch):
    whole = write_test_video(tmp_path / "whole.avi", 100, codec="mpeg4").read_bytes()
    path = tmp_path / "cut.avi"
    path.write_bytes(whole[: len(whole) * 6 // 10])
    counts = set()
    for name in ("torchcodec", "pyav"):
        monkeypatch.setenv(video.DECODER_ENV, name)
        counts.add(count_frames(path))
    assert len(counts) == 1


# --- decoder choice ---------------------------------------------------------------------------


@pytest.fixture
def torchcodec_missing(monkeypatch):
    """Make `from torchcodec.decoders import ...` fail, as on a machine without FFmpeg's libraries."""
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
    video._torchcodec_decoder.cache_clear()
    yield
    video._torchcodec_decoder.cache_clear()


def test_falls_back_to_pyav_with_one_warning(videos, torchcodec_missing, monkeypatch):
    monkeypatch.delenv(video.DECODER_ENV, raising=False)
    with pytest.warns(RuntimeWarning, match="PyAV") as caught:
        assert video.decoder_name() == "pyav"
        frames = decode_frames(videos["mpeg4", 11], sample_indices(11))
        assert count_frames(videos["mpeg4", 11]) == 11
    assert len(caught) == 1
    assert indices_of(frames) == TEST_INDICES[11]


def test_forced_torchcodec_without_it_is_an_error(torchcodec_missing, monkeypatch):
    monkeypatch.setenv(video.DECODER_ENV, "torchcodec")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="torchcodec"):
            video.decoder_name()


def test_unknown_decoder_name_is_refused(monkeypatch):
    monkeypatch.setenv(video.DECODER_ENV, "opencv")
    with pytest.raises(ValueError, match="STRM_DECODER"):
        video.decoder_name()


def test_default_decoder_is_torchcodec(monkeypatch):
    monkeypatch.delenv(video.DECODER_ENV, raising=False)
    assert video.decoder_name() == "torchcodec"


# --- views --------------------------------------------------------------------------------------


def column_frames(height: int, width: int, frames: int = 8) -> torch.Tensor:
    """uint8 [T, 3, H, W] whose pixel (y, x) encodes x (channels 0-1) and y (channel 2)."""
    x = torch.arange(width)
    y = torch.arange(height)
    image = torch.stack(
        [
            (x % 256).expand(height, width),
            (x // 256).expand(height, width),
            y[:, None].expand(height, width),
        ]
    ).to(torch.uint8)
    return image.expand(frames, 3, height, width).clone()


def decode_xy(crop: torch.Tensor) -> tuple[int, int, bool]:
    """(left, top, flipped) of a crop of column_frames."""
    xs = crop[0].long() + 256 * crop[1].long()
    return int(xs[0].min()), int(crop[2, 0, 0]), bool(xs[0, 0] > xs[0, -1])


def test_test_view_is_the_centre_crop():
    out = transform_view(column_frames(256, 512), train=False, rng=None)
    assert out.shape == (8, 3, 224, 224)
    assert decode_xy(out[0]) == ((512 - 224) // 2, (256 - 224) // 2, False)


def test_train_view_crop_and_flip_are_shared_by_the_frames_and_cover_the_range():
    lefts, tops, flips = set(), set(), set()
    for seed in range(32):
        out = transform_view(column_frames(256, 300), train=True, rng=np.random.default_rng(seed))
        assert out.shape == (8, 3, 224, 224)
        per_frame = {decode_xy(frame) for frame in out}
        assert len(per_frame) == 1  # one crop and one flip for all 8 frames
        left, top, flipped = per_frame.pop()
        assert 0 <= left <= 300 - 224 and 0 <= top <= 256 - 224
        lefts.add(left)
        tops.add(top)
        flips.add(flipped)
    assert flips == {False, True} and len(lefts) > 10 and len(tops) > 10


def test_shorter_side_is_resized_to_256():
    out = transform_view(column_frames(48, 64), train=False, rng=None, spec=ViewSpec(256, 256))
    assert out.shape == (8, 3, 256, 256)  # 64 x 48 -> 341 x 256, centre 256 x 256
    with pytest.raises(ValueError):
        ViewSpec(short_side=200, crop=224)


def load_view_job(args: tuple) -> torch.Tensor:
    path, n, video_id, view = args
    return load_view(path, n, video_id, view, seed=3, spec=ViewSpec(48, 48))


def test_load_view_frames_and_flip(tmp_path):
    """A square 48 x 48 video with a 48/48 spec: resize and crop are no-ops, so indices stay readable."""
    path = write_test_video(tmp_path / "sq.mp4", 40, size=(48, 48))
    test_view = load_view(path, 40, "c/sq", 0, seed=3, spec=ViewSpec(48, 48))
    assert indices_of(test_view) == TEST_INDICES[40]
    seen_flip = set()
    for view in range(1, 9):
        frames = load_view(path, 40, "c/sq", view, seed=3, spec=ViewSpec(48, 48))
        assert torch.equal(frames, load_view(path, 40, "c/sq", view, seed=3, spec=ViewSpec(48, 48)))
        expected = sample_indices(40, train=True, rng=view_rng(3, "c/sq", view))
        plain, mirrored = indices_of(frames), indices_of(frames.flip(-1))
        assert expected in (plain, mirrored)  # the jittered indices, flipped or not
        seen_flip.add(mirrored == expected and plain != expected)
    assert seen_flip == {False, True}


def test_load_views_decodes_once_and_equals_each_view_built_alone(tmp_path, monkeypatch):
    path = write_test_video(tmp_path / "v.avi", 57, codec="mpeg4", size=(96, 64))
    spec = ViewSpec(56, 40)
    calls = []
    real_decode = video.decode_frames
    monkeypatch.setattr(video, "decode_frames", lambda p, i: calls.append(list(i)) or real_decode(p, i))
    together = load_views(path, 57, "c/v", [0, 1, 2, 3], seed=5, spec=spec)
    assert together.shape == (4, 8, 3, 40, 40) and len(calls) == 1
    for view in range(4):
        rng = view_rng(5, "c/v", view)
        alone = transform_view(real_decode(path, sample_indices(57, view > 0, rng)), view > 0, rng, spec)
        assert torch.equal(together[view], alone), view
        assert torch.equal(together[view], load_view(path, 57, "c/v", view, seed=5, spec=spec))


@pytest.mark.parametrize("decoder", ["torchcodec", "pyav"], indirect=True)
def test_a_window_is_the_clips_test_view_and_repeats_frames_of_a_short_one(tmp_path, decoder):
    """load_window(path, 0, n), how predict takes a person's clip, is exactly load_view's view 0 from 8
    frames on; below 8 the frames repeat (7: 0, 0, 1, ..., 6; 1: eight times frame 0)."""
    spec = ViewSpec(48, 48)
    for n in (8, 11, 40):
        path = write_test_video(tmp_path / f"v{n}.mp4", n, size=(48, 48))
        assert torch.equal(load_window(path, 0, n, spec), load_view(path, n, "c/v", 0, seed=0, spec=spec))
    for n, want in ((7, [0, 0, 1, 2, 3, 4, 5, 6]), (1, [0] * 8)):
        path = write_test_video(tmp_path / f"short{n}.mp4", n, size=(48, 48))
        assert indices_of(load_window(path, 0, n, spec)) == want


def test_frame_times_follow_the_container_not_the_average_rate(tmp_path):
    """A variable frame rate (10 fps for 3 s, then 30 fps): each frame's time is its own timestamp, in
    display order (B-frames), and frame i of the decoders is the frame at times[i]."""
    path = write_vfr_video(tmp_path / "vfr.mp4", VFR_TIMES)
    times = frame_times(path, count_frames(path))
    assert np.allclose(times, VFR_TIMES, atol=1e-3)
    assert indices_of(decode_frames(path, [29, 30, 119])) == [29, 30, 119]
    assert frame_rate(path) == pytest.approx(120 / 6, rel=0.05)  # the average: no use for times
    constant = write_test_video(tmp_path / "cfr.mp4", 20, fps=12)
    assert np.allclose(frame_times(constant), [k / 12 for k in range(20)], atol=1e-3)
    assert len(frame_times(constant, 25)) == 25  # asked for more than the timestamps: the rate's spacing


def test_short_video_repeats_frames_when_asked(tmp_path):
    path = write_test_video(tmp_path / "five.mp4", 5, size=(48, 48))
    with pytest.raises(ValueError):
        load_view(path, 5, "c/five", 0, seed=0, spec=ViewSpec(48, 48))
    frames = load_view(path, 5, "c/five", 0, seed=0, spec=ViewSpec(48, 48), repeat_short=True)
    assert indices_of(frames) == [0, 0, 1, 1, 2, 2, 3, 4]


def test_views_do_not_depend_on_worker_count_or_order(tmp_path):
    jobs = [
        (str(write_test_video(tmp_path / f"v{k}.mp4", 30 + 7 * k, size=(48, 48))), 30 + 7 * k, f"c/v{k}", view)
        for k in range(3)
        for view in range(3)
    ]
    here = {job: load_view_job(job) for job in jobs}
    there = {item: value for item, value, error in imap_isolated(load_view_job, reversed(jobs), workers=2)}
    assert set(there) == set(jobs)
    for job in jobs:
        assert torch.equal(here[job], there[job]), job


# The digest of what the rule picks (indices, crops, flips) for many lengths and views. If this
# test fails you changed what a view contains: bump SAMPLING_RULE_VERSION (it is in every cache's
# fingerprint, so old caches are refused) and pin the new digest here. Pinned across runs, it also
# proves view_rng does not depend on Python's per-process salted hash().
RULE_DIGESTS = {"trx-linspace8-jitter5/256-224-flip/blake2b-rng/1": "5bc77e8ccd26bd33"}


def test_changing_the_rule_needs_a_new_version():
    digest = hashlib.sha256()
    frames = column_frames(256, 341, frames=1)
    for n in range(8, 80):
        digest.update(str(sample_indices(n)).encode())
        for view in (1, 2, 3):
            rng = view_rng(0, f"c/{n}", view)
            digest.update(str(sample_indices(n, train=True, rng=rng)).encode())
            digest.update(str(decode_xy(crop_view(frames, True, rng)[0])).encode())
    assert RULE_DIGESTS.get(SAMPLING_RULE_VERSION) == digest.hexdigest()[:16]


def test_no_flip_spec_keeps_the_same_crops_and_never_mirrors():
    """ViewSpec(flip=False) draws the same random crops as the default, only unmirrored."""
    from pipeline.data.video import ViewSpec, draw_crop, view_rng

    on, off = ViewSpec(128, 112), ViewSpec(128, 112, flip=False)
    crops_on = [draw_crop(128, 170, True, view_rng(0, f"v{i}", 1), on) for i in range(40)]
    crops_off = [draw_crop(128, 170, True, view_rng(0, f"v{i}", 1), off) for i in range(40)]
    assert any(c.flip for c in crops_on)
    assert not any(c.flip for c in crops_off)
    assert [(c.top, c.left) for c in crops_on] == [(c.top, c.left) for c in crops_off]
