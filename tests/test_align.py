import numpy as np
from PIL import Image, ImageDraw

from cervl.faces.align import apply_affine, fit_similarity, template, warp_affine


def test_fit_similarity_recovers_known_transform():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    a, s, t = np.deg2rad(23), 1.7, np.array([12.0, -4.0])
    m_true = np.array([[s * np.cos(a), -s * np.sin(a), t[0]], [s * np.sin(a), s * np.cos(a), t[1]]])
    m = fit_similarity(src, apply_affine(m_true, src))
    assert np.allclose(m, m_true, atol=1e-9)


def test_warp_moves_a_dot_to_the_predicted_pixel():
    img = Image.new("L", (200, 200), 0)
    ImageDraw.Draw(img).ellipse([117 - 3, 64 - 3, 117 + 3, 64 + 3], fill=255)  # centre (117, 64)
    m = np.array([[0.8, -0.3, 10.0], [0.3, 0.8, -20.0]])
    out = np.asarray(warp_affine(img, m, 160), dtype=float)
    ys, xs = np.nonzero(out > 0)
    w = out[ys, xs]
    centroid = np.array([(xs * w).sum() / w.sum(), (ys * w).sum() / w.sum()])
    assert np.allclose(centroid, apply_affine(m, np.array([[117.0, 64.0]]))[0], atol=0.25)


def test_template_scales():
    assert np.allclose(template(224), template(112) * 2)
