"""A classical detector for toy-world images: objects (shape, color, bbox, material) and scene properties.

It reads any 64x64 RGB image, generated or rendered, with no learned weights:

1. **Foreground** = saturated pixels. Backgrounds are low-saturation tints (HSV saturation <= 0.12) and
   objects are saturated colors, so saturation separates them whatever the lighting (a global factor
   leaves hue and saturation unchanged).
2. **Color** of each foreground pixel = the nearest reference hue; a 3x3 majority vote among foreground
   labels removes the blended hue that anti-aliasing leaves where two objects of different colors touch.
3. **Objects** = 8-connected components per color. Holes are filled (an outlined shape becomes its
   silhouette); thin open slivers are dropped.
4. **Shape** from the silhouette: solidity (area / convex hull area) separates the star from the convex
   shapes; extent (area / box area) separates square (0.74/0.74 = 1) > circle (0.79) > triangle (0.5).
   **Material**: colored area / silhouette area (solid ~1, outlined much less).
5. **Scene**: a smooth surface (1, x, y, x^2 + y^2) is fitted to the background's brightness. Its
   horizontal, vertical and radial contrast name the style; the brightest point of the fitted surface is
   the lighting; the median object extent (normalised per shape) is the camera scale.

Everything is vectorised numpy/scipy; one image takes about a millisecond.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from toyworld import vocab as V

SAT_THRESHOLD = 0.38  # foreground: HSV saturation above this ...
VALUE_THRESHOLD = 0.12  # ... and value above this
PRESMOOTH_SIGMA = 0.6  # px, Gaussian on the image before anything else
MIN_AREA = 12  # px; smaller components are noise
REF_HUES = {name: colorsys.rgb_to_hsv(*rgb)[0] * 360.0 for name, rgb in V.COLORS.items()}

# Shape classification thresholds on silhouette features (tuned on renders of every shape at every size,
# clean and blurred, see tests/test_detector.py).
HARMONIC_MIN = 0.05  # the strongest 3/4/5-fold harmonic of the radial profile must exceed this, else circle
OUTLINED_FILL = 0.91  # mean coverage of the silhouette's interior below this: outlined (solid >= 0.95)

# Area of each shape as a fraction of (nominal extent)^2 (see toyworld.render.shape_outline); the
# extent estimate sqrt(area / fraction) uses coverage, so it is blur-insensitive.
SHAPE_AREA = {
    "circle": math.pi / 4,
    "square": 0.86**2,
    "triangle": 0.5 * 0.9,
    "star": 5 * 0.5 * math.sin(math.radians(36)) / (2 * math.sin(math.radians(72))) ** 2,
}

STYLE_CONTRAST = 0.15  # relative brightness change across the image that makes a gradient / vignette


@dataclass
class DetectedObject:
    shape: str
    color: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), pixels
    area: int  # silhouette area, px
    material: str
    extent: float  # nominal extent estimate, px (box size / the shape's box ratio)
    score: float  # ranking like a detector's confidence: silhouette area x mean saturation
    features: dict[str, float] | None = None  # shape features and colored fill (diagnostics)

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return (x0 + x1) / 2.0, (y0 + y1) / 2.0


@dataclass
class Detection:
    objects: list[DetectedObject]
    style: str
    lighting: str
    brightness: float  # brightest point of the fitted background, in [0, 1]
    scale: float | None  # median nominal object extent, px (None when no object)
    contrast: dict[str, float]  # horizontal / vertical / radial relative contrast of the background

    def by_class(self) -> dict[str, list[DetectedObject]]:
        out: dict[str, list[DetectedObject]] = {}
        for o in sorted(self.objects, key=lambda o: -o.score):
            out.setdefault(o.shape, []).append(o)
        return out

    def to_json(self) -> dict:
        return asdict(self)


def _hsv(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue (degrees), saturation, value of a float RGB image."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    mx = img.max(axis=-1)
    mn = img.min(axis=-1)
    delta = mx - mn
    sat = np.where(mx > 1e-6, delta / np.maximum(mx, 1e-6), 0.0)
    d = np.maximum(delta, 1e-6)
    hue = np.where(mx == r, ((g - b) / d) % 6.0, np.where(mx == g, (b - r) / d + 2.0, (r - g) / d + 4.0)) * 60.0
    return hue, sat, mx


def _hue_labels(hue: np.ndarray) -> np.ndarray:
    names = list(REF_HUES)
    refs = np.array([REF_HUES[n] for n in names])
    diff = np.abs(hue[..., None] - refs)
    diff = np.minimum(diff, 360.0 - diff)
    return diff.argmin(axis=-1)


_N_RAYS = 40
_RAY_STEP = 0.25  # px


def radial_profile(alpha: np.ndarray, cx: float, cy: float, max_len: float) -> np.ndarray:
    """Length of the shape along ``_N_RAYS`` rays from (cx, cy): the integral of coverage along each ray.

    Coverage integrates to the same length whether the edge is sharp or blurred, so the profile is
    insensitive to blur; the rays start at angle 0 (pointing right) and turn clockwise on screen.
    """
    theta = np.arange(_N_RAYS) * (2 * np.pi / _N_RAYS)
    t = np.arange(_RAY_STEP / 2, max_len, _RAY_STEP)
    xs = cx - 0.5 + np.cos(theta)[:, None] * t[None, :]  # pixel (i, j) has its center at (j + 0.5, i + 0.5)
    ys = cy - 0.5 + np.sin(theta)[:, None] * t[None, :]
    samples = ndimage.map_coordinates(alpha, [ys.ravel(), xs.ravel()], order=1, mode="constant", cval=0.0)
    return samples.reshape(_N_RAYS, -1).sum(axis=1) * _RAY_STEP


def shape_features(alpha: np.ndarray) -> dict[str, float]:
    """Blur-robust features of a silhouette given as a coverage map in [0, 1] (other objects masked out).

    ``h3``, ``h4``, ``h5``: strength of the 3-, 4- and 5-fold harmonics of the radial profile around
    the centroid, relative to the mean radius (triangle, square, star; a circle has none); ``area``: the
    coverage sum, px.
    """
    area = float(alpha.sum())
    ys, xs = np.mgrid[0 : alpha.shape[0], 0 : alpha.shape[1]]
    cx = float((alpha * (xs + 0.5)).sum() / max(area, 1e-6))
    cy = float((alpha * (ys + 0.5)).sum() / max(area, 1e-6))
    r = radial_profile(alpha, cx, cy, max_len=float(max(alpha.shape)))
    theta = np.arange(_N_RAYS) * (2 * np.pi / _N_RAYS)
    mean = max(float(r.mean()), 1e-6)
    feats = {"area": area, "cx": cx, "cy": cy, "radius": mean}
    for m in (1, 2, 3, 4, 5, 6):
        feats[f"h{m}"] = float(np.abs((r * np.exp(-1j * m * theta)).mean()) * 2 / mean)
    return feats


def classify_shape(feats: dict[str, float]) -> str:
    """Shape name from `shape_features`: the strongest of the 3-, 4-, 5-fold harmonics, or a circle."""
    h = {"triangle": feats["h3"], "square": feats["h4"], "star": feats["h5"]}
    best = max(h, key=h.get)
    return best if h[best] > HARMONIC_MIN else "circle"


def _basis(n: int) -> np.ndarray:
    t = (np.arange(n) + 0.5) / n - 0.5
    xx, yy = np.meshgrid(t, t)
    return np.stack([np.ones_like(xx), xx, yy, xx**2 + yy**2], -1)  # (H, W, 4): 1, x, y, r^2


def _fit_surface(values: np.ndarray, mask: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Least-squares coefficients of ``values`` (H, W[, C]) over ``mask`` pixels in ``basis``."""
    a = basis[mask]
    if len(a) < 16:  # nearly no background visible: a flat fit of everything
        flat = np.zeros((basis.shape[-1],) + values.shape[2:])
        flat[0] = np.median(values.reshape(-1, *values.shape[2:]), axis=0)
        return flat
    coef, *_ = np.linalg.lstsq(a, values[mask], rcond=None)
    return coef


def detect(image: np.ndarray) -> Detection:
    """Detect objects and scene properties in one (H, W, 3) uint8 (or float in [0, 1]) RGB image."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"detect() needs an (H, W, 3) RGB array, got {getattr(image, 'shape', type(image))}")
    img = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
    n = img.shape[0]
    # segmentation runs on a lightly smoothed copy: pixel noise, which saturation amplifies in dim images
    smooth = ndimage.gaussian_filter(img, sigma=(PRESMOOTH_SIGMA, PRESMOOTH_SIGMA, 0), mode="nearest")
    hue, sat, val = _hsv(smooth)
    fg = (sat > SAT_THRESHOLD) & (val > VALUE_THRESHOLD)

    # per-pixel color, then a 3x3 majority vote among foreground labels (ties keep the pixel's own)
    labels = _hue_labels(hue)
    n_colors = len(REF_HUES)
    votes = np.stack([ndimage.uniform_filter(((labels == c) & fg).astype(np.float32), 3) for c in range(n_colors)])
    own = np.take_along_axis(votes, labels[None], 0)[0]
    labels = np.where(votes.max(0) > own + 1e-6, votes.argmax(0), labels)

    # background: a smooth surface per channel (for coverage) and of brightness (for style and lighting)
    basis = _basis(n)
    bg_mask = ~ndimage.binary_dilation(fg, iterations=2)
    bg_rgb = basis @ _fit_surface(img, bg_mask, basis)  # (H, W, 3)
    value_coef = _fit_surface(img.max(axis=-1), bg_mask, basis)

    names = list(REF_HUES)
    objects: list[DetectedObject] = []
    eight = np.ones((3, 3), bool)
    for c in range(n_colors):
        mask = fg & (labels == c)
        if mask.sum() < MIN_AREA:
            continue
        comp, n_comp = ndimage.label(mask, structure=eight)
        for idx in range(1, n_comp + 1):
            part = comp == idx
            colored = int(part.sum())
            if colored < MIN_AREA:
                continue
            filled = ndimage.binary_fill_holes(part)
            if filled.sum() - colored < 4 and ndimage.distance_transform_edt(part).max() < 1.5:
                continue  # a thin open sliver (blended edge between touching objects), not an object
            obj = _measure(img, bg_rgb, part, filled, fg & ~part)
            if obj is None:
                continue
            shape = classify_shape(obj)
            ys, xs = np.nonzero(filled)
            bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            extent = math.sqrt(obj["area"] / SHAPE_AREA[shape])
            material = "solid" if obj["fill"] >= OUTLINED_FILL else "outlined"
            score = float(obj["area"] * sat[part].mean())
            objects.append(DetectedObject(shape, names[c], bbox, int(filled.sum()), material, extent, score, obj))

    surface = basis @ value_coef
    brightness = float(np.clip(surface.max(), 0.0, 1.0))
    top = max(brightness, 1e-3)
    contrast = {
        "horizontal": abs(float(value_coef[1])) / top,  # change from left edge to right edge
        "vertical": abs(float(value_coef[2])) / top,
        "radial": -float(value_coef[3]) * 0.5 / top,  # change from center to corners (r^2 = 0.5 there)
    }
    kind = max(contrast, key=contrast.get)
    if contrast[kind] < STYLE_CONTRAST:
        style = "plain"
    else:
        style = {"horizontal": "horizontal gradient", "vertical": "vertical gradient", "radial": "vignette"}[kind]
    scale = float(np.median([o.extent for o in objects])) if objects else None
    return Detection(objects, style, classify_lighting(brightness), brightness, scale, contrast)


def _measure(
    img: np.ndarray, bg_rgb: np.ndarray, part: np.ndarray, filled: np.ndarray, others: np.ndarray
) -> dict[str, float] | None:
    """Coverage map of one object and its features; None if its color cannot be told from the background.

    Coverage is the projection of (pixel - background) on (object color - background): blending is
    linear, so this recovers the anti-aliased / blurred fraction of each pixel the object covers.
    """
    core = ndimage.binary_erosion(part)
    color = np.median(img[core if core.sum() >= 4 else part], axis=0)
    diff = color[None, None, :] - bg_rgb
    norm = (diff**2).sum(-1)
    if float(np.median(norm[part])) < 1e-3:
        return None
    alpha = np.clip(((img - bg_rgb) * diff).sum(-1) / np.maximum(norm, 1e-6), 0.0, 1.0)
    region = ndimage.binary_dilation(filled, iterations=2) & ~others
    alpha = np.where(region, alpha, 0.0)
    inside = ndimage.binary_erosion(filled)
    interior = inside if inside.sum() >= 4 else filled
    fill = float(alpha[interior].mean())  # edges excluded: solid ~1, outlined has background inside
    silhouette = np.where(inside, 1.0, alpha)  # outlined shapes: their inside counts as the shape
    ys, xs = np.nonzero(region)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    feats = shape_features(silhouette[y0:y1, x0:x1])
    feats["cx"] += float(x0)
    feats["cy"] += float(y0)
    feats["fill"] = fill
    return feats


def lighting_thresholds() -> list[tuple[float, str]]:
    """Brightness thresholds between lighting levels: the midpoints of their background value ranges."""
    lo, hi = V.BACKGROUND_VALUE_RANGE
    levels = sorted(V.LIGHTING.items(), key=lambda kv: kv[1])
    out = []
    for (name_a, fa), (_, fb) in zip(levels, levels[1:]):
        out.append(((hi * fa + lo * fb) / 2.0, name_a))
    out.append((math.inf, levels[-1][0]))
    return out


def classify_lighting(brightness: float) -> str:
    for threshold, name in lighting_thresholds():
        if brightness < threshold:
            return name
    raise AssertionError("unreachable")


def classify_camera(extent: float, size: str = V.DEFAULT_SIZE) -> str:
    """The camera level whose zoom best explains a measured object extent of an object of ``size``."""
    ratio = math.log(max(extent, 1e-3) / V.SIZES[size])
    return min(V.CAMERA, key=lambda c: abs(ratio - math.log(V.CAMERA[c])))
