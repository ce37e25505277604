"""The heat map a person sees is the local T2 map, and it is hot where the defect is (issue 14)."""

import base64
import io

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from scipy import ndimage

from aae_ray import serving
from aae_ray.data.images import encode_png, mask_arrays, to_model_input
from aae_ray.data.synthetic import render_defect_with_mask
from aae_ray.detector import Detector


@pytest.fixture(scope="module")
def defects() -> tuple[np.ndarray, np.ndarray]:
    """Voids and particles, the plainly local kinds, with the generator's masks, at 32 x 32."""
    pairs = [render_defect_with_mask(np.random.default_rng([7, i]), kind, 128)
             for i, kind in enumerate(["void", "particle"] * 10)]
    X = to_model_input([encode_png(img) for img, _ in pairs], 32)
    masks = mask_arrays([encode_png(m.astype(np.uint8) * 255) for _, m in pairs], 32)
    return X, masks


def peak_in_mask(maps: np.ndarray, masks: np.ndarray, reach: int = 2) -> float:
    """Share of images whose map maximum lies in the mask grown by `reach` pixels (a 2 px cell of the map)."""
    hits = []
    for amap, mask in zip(maps, masks, strict=True):
        grown = ndimage.binary_dilation(mask > 0.5, iterations=reach)
        hits.append(grown[np.unravel_index(amap.argmax(), amap.shape)])
    return float(np.mean(hits))


def decode_heatmap(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.float64)


def test_the_served_heat_map_peaks_inside_the_defect(solder, defects):
    """What `/score?explain=true` returns (serving.score_images is the replica's scoring) for the default AAE,
    10 epochs on the 340 solder normals: the peak of the heat map lies on the defect for most voids and
    particles (measured 1.00 / 0.95 / 1.00 of 20 for seeds 0 / 1 / 2; the reconstruction-error map of the same
    models: 0.25 / 0.20 / 0.25)."""
    torch.manual_seed(0)
    det = Detector(tiny_config(epochs=10, seed=0)).fit(solder.normals)
    X, masks = defects
    results = serving.score_images(det, X, [True] * len(X))
    maps = np.stack([decode_heatmap(r["heatmap"]) for r in results])
    assert maps.shape == (len(X), 32, 32)
    np.testing.assert_allclose([r["heatmap_max"] for r in results], det.anomaly_map(X).reshape(len(X), -1).max(1),
                               rtol=1e-5)
    assert peak_in_mask(maps, masks) >= 0.8
