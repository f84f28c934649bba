"""Face detection and alignment on real faces shipped inside registry packages."""

import numpy as np
import pytest
from PIL import Image

from cervl.faces.align import template
from cervl.faces.detect import make_detector
from cervl.faces.pipeline import FaceAligner

skimage_data = pytest.importorskip("skimage.data")
cbook = pytest.importorskip("matplotlib.cbook")


def astronaut():
    return Image.fromarray(skimage_data.astronaut())


def grace_hopper():
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("RGB")


@pytest.fixture(scope="module")
def detector():
    try:
        return make_detector("mtcnn")
    except RuntimeError as e:
        pytest.skip(str(e))


def _inside(p, box):
    return box[0] <= p[0] <= box[2] and box[1] <= p[1] <= box[3]


@pytest.mark.parametrize("load, face_box", [
    # hand-checked face regions (x1, y1, x2, y2) in the original images
    (astronaut, (170, 50, 285, 185)),
    (grace_hopper, (160, 100, 370, 360)),
])
def test_real_face_found_with_landmarks_in_the_right_regions(detector, load, face_box):
    img = load()
    faces = detector.detect([img])[0]
    assert len(faces) == 1 and faces[0].score > 0.95
    f = faces[0]
    box = f.box
    iou_box = (max(box[0], face_box[0]), max(box[1], face_box[1]), min(box[2], face_box[2]), min(box[3], face_box[3]))
    assert iou_box[2] > iou_box[0] and iou_box[3] > iou_box[1]
    le, re_, nose, ml, mr = f.landmarks
    for p in f.landmarks:
        assert _inside(p, box)
    assert le[0] < nose[0] < re_[0]  # eyes either side of the nose
    assert ml[0] < mr[0]
    assert max(le[1], re_[1]) < nose[1] < min(ml[1], mr[1])  # eyes above nose above mouth
    h = box[3] - box[1]
    assert (le[1] - box[1]) / h < 0.5 and (ml[1] - box[1]) / h > 0.55


def test_aligned_crop_puts_eyes_on_template(detector):
    from cervl.faces.align import apply_affine, fit_similarity

    aligner = FaceAligner(detector, size=112)
    res = aligner.align(astronaut())[0]
    assert res.status == "ok" and res.crop.size == (112, 112)
    m = fit_similarity(np.array(res.landmarks), template(112))
    eyes = apply_affine(m, np.array(res.landmarks)[:2])
    assert np.abs(eyes - template(112)[:2]).max() < 3.0
    # independent check: re-detected on the crop, the eyes are level and at the template's spacing
    again = detector.detect([res.crop.resize((224, 224), Image.BICUBIC)])[0]
    assert again, "the aligned crop should still contain a detectable face"
    le, re_ = again[0].landmarks[:2] / 2.0
    assert abs(le[1] - re_[1]) < 2.0
    spacing = template(112)[1, 0] - template(112)[0, 0]
    assert abs((re_[0] - le[0]) - spacing) < 0.12 * spacing
    assert abs((le[0] + re_[0]) / 2 - 56) < 3.0


def test_face_free_image_reports_no_face(detector):
    rng = np.random.default_rng(0)
    sky = Image.fromarray((np.ones((240, 320, 3)) * [90, 140, 200] + rng.normal(0, 3, (240, 320, 3))).clip(0, 255)
                          .astype(np.uint8))
    assert detector.detect([sky])[0] == []
    aligner = FaceAligner(detector, fallback="center")
    res = aligner.align(sky)[0]
    assert res.status == "no_face_center_crop" and res.crop.size == (112, 112)
    assert FaceAligner(detector).align(sky)[0].status == "no_face"


def test_two_faces_composed(detector):
    a = astronaut().resize((256, 256))
    g = grace_hopper().resize((220, 256))
    canvas = Image.new("RGB", (520, 300), (128, 128, 128))
    canvas.paste(a, (10, 20))
    canvas.paste(g, (290, 30))
    faces = detector.detect([canvas])[0]
    assert len(faces) == 2
    xs = sorted((f.box[0] + f.box[2]) / 2 for f in faces)
    assert xs[0] < 260 < xs[1]
    res = FaceAligner(detector, faces="all").align(canvas)
    assert len(res) == 2 and {r.status for r in res} == {"multiple"}


@pytest.mark.parametrize("angle", [-30, 25])
def test_rotated_input_aligns_upright(detector, angle):
    img = grace_hopper().rotate(angle, resample=Image.BICUBIC, expand=True, fillcolor=(128, 128, 128))
    faces = detector.detect([img])[0]
    assert faces
    le, re_ = faces[0].landmarks[:2]
    tilt = np.degrees(np.arctan2(re_[1] - le[1], re_[0] - le[0]))
    assert abs(tilt + angle) < 12  # PIL rotates counter-clockwise: the eye line tilts by -angle
    crop = FaceAligner(detector).align(img)[0].crop
    eyes = detector.detect([crop.resize((224, 224))])[0][0].landmarks[:2] / 2
    assert abs(eyes[0, 1] - eyes[1, 1]) < 4  # upright after alignment


def test_synthce_original_aligns_to_its_aligned_variant(tmp_path):
    """With SynthCE's known landmarks, aligning the original reproduces the shipped aligned image."""
    from cervl.data import make_reader
    from cervl.data.synth import generate

    generate(tmp_path, per_class=2, seed=11, subsets=("compound",), progress=False)
    orig = make_reader("rafdb", tmp_path / "compound", subset="compound", variant="original").read()
    aligned = {r.id: r for r in make_reader("rafdb", tmp_path / "compound", subset="compound").read()}
    aligner = FaceAligner.__new__(FaceAligner)
    aligner.size, aligner.faces, aligner.fallback, aligner.detector = 112, "largest", "skip", None
    diffs = []
    for r in orig[:8]:
        img = Image.open(tmp_path / "compound" / r.image)
        crop = aligner.align(img, landmarks=r.landmarks)[0].crop
        ref = np.asarray(Image.open(tmp_path / "compound" / aligned[r.id].image), dtype=float)
        diffs.append(np.abs(np.asarray(crop, dtype=float) - ref).mean())
    assert max(diffs) < 4.0  # JPEG round trips only (0-255 scale)


def test_yunet_backend_when_its_model_is_available():
    """YuNet needs a one-time ONNX download; set CERVL_YUNET_MODEL to its path to run this test."""
    import os

    path = os.environ.get("CERVL_YUNET_MODEL")
    if not path:
        pytest.skip("CERVL_YUNET_MODEL not set (the YuNet model is downloaded separately)")
    faces = make_detector("yunet", model_path=path).detect([astronaut()])[0]
    assert len(faces) == 1 and faces[0].landmarks[0, 0] < faces[0].landmarks[1, 0]


def test_unknown_detector_and_missing_yunet_model_are_clear_errors():
    with pytest.raises(KeyError, match="unknown face detector 'dlib'"):
        make_detector("dlib")
    with pytest.raises(RuntimeError, match="needs model_path"):
        make_detector("yunet")


def _two_sizes():
    """A large astronaut face and a small Grace Hopper face on one 640x480 canvas."""
    canvas = Image.new("RGB", (640, 480), (128, 128, 128))
    canvas.paste(astronaut().crop((140, 20, 320, 220)).resize((270, 300)), (10, 90))
    canvas.paste(grace_hopper().resize((60, 70)), (480, 60))
    return canvas


@pytest.mark.parametrize("load", [astronaut, grace_hopper, _two_sizes])
def test_largest_first_search_finds_the_same_largest_face(detector, load):
    img = load()
    full = detector.detect([img])[0]
    fast = make_detector("mtcnn", search="largest").detect([img])[0]
    assert full and fast
    np.testing.assert_allclose(fast[0].landmarks, full[0].landmarks, atol=0.05)
    np.testing.assert_allclose(fast[0].box, full[0].box, atol=0.05)


def test_largest_first_search_skips_the_fine_levels_and_still_finds_small_faces(detector):
    det = make_detector("mtcnn", search="largest")
    seen = []
    propose = det._propose
    det._propose = lambda halves, scales: seen.extend(scales) or propose(halves, scales)
    img = _two_sizes()
    faces = det.detect([img])[0]
    all_scales = det._scales(480, 640)
    # the large face (~150 px box) ends the search: levels whose window (12 / scale px) is under
    # half its size are never run, and they are most of the pyramid's pixels
    assert len(faces) == 1 and faces[0].box[2] - faces[0].box[0] > 120
    side = faces[0].box[2] - faces[0].box[0]
    assert max(seen) < all_scales[0] and 12 / max(seen) > side / 4  # finest window run: over a quarter of the face
    cost = lambda scales: sum(s * s for s in scales)  # noqa: E731 - P-Net work ~ pixels per level
    assert cost(seen) < 0.25 * cost(all_scales)
    assert len(detector.detect([img])[0]) == 2  # the full search reports both faces
    # with only a small face the search goes on down to the finest level and finds it
    small_only = Image.new("RGB", (640, 480), (128, 128, 128))
    small_only.paste(grace_hopper().resize((60, 70)), (480, 60))
    seen.clear()
    found = det.detect([small_only])[0]
    assert len(found) == 1 and max(seen) == pytest.approx(all_scales[0])
    np.testing.assert_allclose(found[0].landmarks, detector.detect([small_only])[0][0].landmarks, atol=0.05)


def test_bad_search_option_is_a_clear_error():
    with pytest.raises(ValueError, match="search must be"):
        make_detector("mtcnn", search="biggest")
