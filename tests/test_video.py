"""Video decoding, tracking, smoothing and per-frame prediction; the ABAW command end to end."""

import os

import numpy as np
import pytest
from PIL import Image

from cervl.faces.track import FaceTracker
from cervl.faces.video import VideoError, read_frames
from cervl.predict.video import smooth

cv2 = pytest.importorskip("cv2")
skimage_data = pytest.importorskip("skimage.data")


def write_video(path, frames, fps=10):
    h, w = frames[0].shape[:2]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    for f in frames:
        vw.write(np.ascontiguousarray(f[:, :, ::-1]))
    vw.release()
    return path


def face_frames(n=9, blank=(4, 5)):
    """A face drifting right; frames in ``blank`` (1-based) show no face."""
    face = np.asarray(Image.fromarray(skimage_data.astronaut()).crop((140, 20, 320, 220)).resize((150, 166)))
    out = []
    for i in range(1, n + 1):
        canvas = np.full((240, 320, 3), 110, np.uint8)
        if i not in blank:
            x = 20 + 8 * i
            canvas[30:196, x:x + 150] = face
        out.append(canvas)
    return out


def test_read_frames_numbering_and_every(tmp_path):
    path = write_video(tmp_path / "v.avi", face_frames(7, blank=()))
    assert [n for n, _ in read_frames(path)] == list(range(1, 8))
    assert [n for n, _ in read_frames(path, every=3)] == [1, 4, 7]
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in (1, 2, 3, 10):
        Image.new("RGB", (8, 8)).save(folder / f"{i:05d}.jpg")
    assert [n for n, _ in read_frames(folder, every=2)] == [1, 3]


def test_corrupt_and_empty_videos_raise_clear_errors(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    with pytest.raises(VideoError, match="bad.mp4"):
        list(read_frames(bad))
    with pytest.raises(VideoError, match="not found"):
        list(read_frames(tmp_path / "missing.mp4"))


def test_smoothing_keeps_distributions():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), 20)
    for method in ("moving", "gaussian"):
        s = smooth(p, method)
        assert np.allclose(s.sum(1), 1) and s.std(0).sum() < p.std(0).sum()
    assert np.array_equal(smooth(p, "none"), p)
    step = np.zeros((10, 2))
    step[:5, 0] = step[5:, 1] = 1
    assert smooth(step, "moving", window=3)[4].tolist() == pytest.approx([2 / 3, 1 / 3])


def test_tracker_keeps_the_same_person():
    from cervl.faces.detect import Face

    def f(x):
        return Face(np.array([x, 0, x + 50, 60.0]), 1.0, np.zeros((5, 2)))

    t = FaceTracker()
    assert t.choose([f(100), f(0)])[0].box[0] == 100  # largest/first to start
    assert t.choose([f(0), f(105)])[0].box[0] == 105  # follows overlap, not order
    assert t.choose([])[1] == "lost"
    assert t.choose([f(300), f(110)])[0].box[0] == 110


def test_video_round_trip_through_prediction(tmp_path):
    from cervl.faces.detect import make_detector
    from cervl.models.loading import build_tiny
    from cervl.predict import Predictor, plot_video_probs, predict_video

    try:
        det = make_detector("mtcnn")
    except RuntimeError as e:
        pytest.skip(str(e))
    path = write_video(tmp_path / "clip.avi", face_frames(9, blank=(4, 5)))
    model, proc = build_tiny("tiny-qwen2-vl", seed=0)
    pred = Predictor(model, proc, "minimal", "cexprdb")
    rows = predict_video(pred, path, det, every=1, smoothing="gaussian")
    assert [r["frame"] for r in rows] == list(range(1, 10))
    assert [r["status"] for r in rows][3:5] == ["lost", "lost"]
    assert all(r["status"] in ("tracked", "switched") for r in rows[:3] + rows[5:])
    assert rows[3]["probs"] is None and rows[3]["pred"] in pred.label_set  # filled from neighbours
    assert all(abs(sum(r["probs_smoothed"].values()) - 1) < 1e-4 for r in rows)  # 6-decimal rounding
    assert [r["id"] for r in rows][:2] == ["clip/00001", "clip/00002"]
    every = predict_video(pred, path, det, every=4)
    assert [r["frame"] for r in every] == [1, 5, 9]
    png = plot_video_probs(rows, pred.label_set.classes, tmp_path / "p.png")
    assert Image.open(png).size[0] > 300


def test_videos_in_worker_processes_match_one_process_and_report_broken_files(tmp_path):
    from cervl.faces.detect import mtcnn_weights_dir
    from cervl.models.loading import build_tiny
    from cervl.predict import Predictor, predict_videos

    try:
        mtcnn_weights_dir()
    except RuntimeError as e:
        pytest.skip(str(e))
    a = write_video(tmp_path / "a.avi", face_frames(7, blank=(3,)))
    frames = tmp_path / "b"  # a folder of frames is a video too
    frames.mkdir()
    for i, f in enumerate(face_frames(5, blank=()), 1):
        Image.fromarray(f).save(frames / f"{i:05d}.png")
    broken = tmp_path / "c.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 cut short")
    model, proc = build_tiny("tiny-qwen2-vl", seed=0)
    pred = Predictor(model, proc, "minimal", "cexprdb")
    paths = [a, broken, frames]
    serial = dict(predict_videos(pred, paths, workers=1, batch_size=4))
    parallel = dict(predict_videos(pred, paths, workers=2, batch_size=4))
    assert sorted(parallel) == [0, 1, 2]
    assert isinstance(parallel[1], str) and "c.mp4" in parallel[1] and "cannot open" in parallel[1]
    for i, n_frames in ((0, 7), (2, 5)):
        assert [r["frame"] for r in parallel[i]] == [r["frame"] for r in serial[i]] == list(range(1, n_frames + 1))
        assert [r["status"] for r in parallel[i]] == [r["status"] for r in serial[i]]
        for rp, rs in zip(parallel[i], serial[i]):
            assert rp["box"] == rs["box"]
            if rs["probs"] is not None:  # same crops, same model: same probabilities
                assert np.allclose(list(rp["probs"].values()), list(rs["probs"].values()), atol=1e-5)
    assert parallel[0][2]["status"] == "lost" and parallel[2][0]["id"] == "b/00001"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_dead_video_worker_is_reported_and_the_others_finish(tmp_path):
    import multiprocessing as mp

    from cervl.faces.detect import mtcnn_weights_dir
    from cervl.faces.video import parallel_video_faces

    try:
        mtcnn_weights_dir()
    except RuntimeError as e:
        pytest.skip(str(e))
    stuck = tmp_path / "stuck"  # a frame folder whose first frame never arrives: its worker hangs in read()
    stuck.mkdir()
    os.mkfifo(stuck / "00001.jpg")
    good = write_video(tmp_path / "good.avi", face_frames(4, blank=()))
    ended, frames = {}, 0
    for kind, i, payload in parallel_video_faces([stuck, good], workers=2, chunk=2):
        frames += len(payload) if kind == "frames" else 0
        if kind in ("done", "error"):
            ended[i] = (kind, payload)
            if i == 1:  # the good video is done: kill the hung worker, as a crash in a decoder would
                for p in mp.active_children():
                    p.kill()
    assert ended[1] == ("done", None) and frames == 4
    assert ended[0][0] == "error" and "stuck" in ended[0][1] and "died" in ended[0][1]
    with pytest.raises(KeyError, match="unknown face detector"):
        next(parallel_video_faces([good], detector="nope"))


class CountingDetector:
    """Wraps MTCNN and counts the expensive calls, to check what tracking actually runs."""

    def __init__(self, det):
        self.det, self.detects, self.refines = det, 0, 0

    def detect(self, images):
        self.detects += 1
        return self.det.detect(images)

    def refine(self, images, boxes):
        self.refines += 1
        return self.det.refine(images, boxes)


@pytest.fixture(scope="module")
def moving_clip():
    from cervl.faces.detect import make_detector
    from clips import moving_face_clip

    try:
        det = make_detector("mtcnn", max_side=320)
    except RuntimeError as e:
        pytest.skip(str(e))
    photo = skimage_data.astronaut()
    lm0 = det.detect([photo])[0][0].landmarks
    frames, truth = moving_face_clip(photo, lm0, n=60)
    return det, frames, truth


def _nme(rows, truth):
    iod = np.linalg.norm(truth[:, 0] - truth[:, 1], axis=1)
    return np.array([np.linalg.norm(np.array(r.landmarks) - truth[i], axis=1).mean() / iod[i]
                     for i, r in enumerate(rows)])


def test_flow_tracking_is_as_accurate_as_detecting_every_frame(moving_clip):
    from cervl.faces.video import track_faces

    det, frames, truth = moving_clip
    counted = CountingDetector(det)
    rows = list(track_faces(enumerate(frames, 1), counted, redetect_every=30, verify_every=5))
    assert [r.frame for r in rows] == list(range(1, 61)) and all(r.crop is not None for r in rows)
    # 60 frames: full detections at frames 1 and 31; O-Net checks on every 5th frame in between (5 + 5),
    # plus one wherever the flow's forward-backward check fails (this clip pans up to 16 px/frame)
    assert counted.detects == 2 and 10 <= counted.refines <= 16, (counted.detects, counted.refines)
    tracked = _nme(rows, truth)
    # the clip rolls +-12 deg and zooms +-20%; per-frame detection on a sample:
    every = list(track_faces(((i + 1, frames[i]) for i in range(0, 60, 6)), det, redetect_every=1))
    detected = _nme(every, truth[::6])
    assert tracked.mean() < 0.03 and tracked.max() < 0.06, (tracked.mean(), tracked.max())
    assert tracked.mean() < 1.5 * detected.mean(), (tracked.mean(), detected.mean())


def test_tracking_follows_an_expression_change(moving_clip):
    """A smile (mouth corners pulled out and up, known path) on top of the moving camera: the
    landmarks must follow the non-rigid motion, not just the head."""
    from clips import Smile, moving_face_clip
    from cervl.faces.video import track_faces

    det = moving_clip[0]
    photo = skimage_data.astronaut()
    lm0 = det.detect([photo])[0][0].landmarks
    field = Smile(lm0)
    moved = field.move(lm0, 1.0)
    np.testing.assert_allclose(moved - field.displacement(moved, 1.0), lm0, atol=1e-9)  # exact truth
    frames, truth = moving_face_clip(photo, lm0, n=60, smile=1.0)
    iod = np.linalg.norm(truth[:, 0] - truth[:, 1], axis=1)
    width = np.linalg.norm(truth[:, 3] - truth[:, 4], axis=1) / iod
    assert width.max() - width.min() > 0.25  # the mouth widens by over a quarter of the eye distance

    def run(redetect, verify):
        rows = list(track_faces(enumerate(frames, 1), det, redetect_every=redetect, verify_every=verify))
        lm = np.array([r.landmarks for r in rows])
        err = (np.linalg.norm(lm - truth, axis=2) / iod[:, None]).mean()
        return err, np.corrcoef(np.linalg.norm(lm[:, 3] - lm[:, 4], axis=1) / iod, width)[0, 1]

    default_err, default_corr = run(120, 10)
    flow_err, flow_corr = run(120, 60)  # optical flow alone after the first detection
    detected_err, _ = run(1, 1)
    # the flow moves each landmark on its own, so it follows the smile closely (measured: r = 0.99);
    # with O-Net checks every 10 frames the result is as good as detecting every frame (0.037 vs 0.034)
    assert flow_corr > 0.95 and flow_err < 0.04, (flow_corr, flow_err)
    assert default_corr > 0.85 and default_err < 0.045 and default_err < 1.3 * detected_err, (
        default_corr, default_err, detected_err)


def test_tracking_schedule_counts(moving_clip):
    from cervl.faces.video import track_faces

    det, frames, _ = moving_clip
    every_frame = CountingDetector(det)
    list(track_faces(enumerate(frames[:6], 1), every_frame, redetect_every=1))
    assert (every_frame.detects, every_frame.refines) == (6, 0)
    onet_only = CountingDetector(det)
    list(track_faces(enumerate(frames[:6], 1), onet_only, redetect_every=100, verify_every=1))
    assert (onet_only.detects, onet_only.refines) == (1, 5)
    with pytest.raises(ValueError):
        list(track_faces(enumerate(frames[:2], 1), det, verify_every=0))


def test_flow_gives_up_when_the_content_changes(moving_clip):
    from cervl.faces.track import LandmarkFlow

    det, frames, truth = moving_clip
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames[:2]]
    face = det.detect([frames[0]])[0][0]
    moved = LandmarkFlow().track(gray[0], gray[1], face.landmarks, face.box)
    iod = np.linalg.norm(truth[1, 0] - truth[1, 1])
    assert moved is not None and np.linalg.norm(moved - truth[1], axis=1).mean() < 0.05 * iod
    noise = np.random.default_rng(0).integers(0, 255, gray[1].shape, dtype=np.uint8)
    assert LandmarkFlow().track(gray[0], noise, face.landmarks, face.box) is None


def test_frame_numbers_without_decoding(tmp_path):
    from cervl.faces.video import frame_numbers

    path = write_video(tmp_path / "c.avi", face_frames(7, blank=()))
    assert frame_numbers(path) == list(range(1, 8))
