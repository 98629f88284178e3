"""Deterministic, anti-aliased renderer of toy scenes (64x64 RGB uint8).

Backgrounds are smooth, so they are computed at 64x64 directly. Each object is drawn with PIL at 4x
resolution in a small patch around it and box-filtered down to an alpha mask (coverage), then blended
over the background in its color. Lighting multiplies the whole image last. The same `Scene` always
gives the same bytes.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import distance_transform_edt

from toyworld import vocab as V
from toyworld.scene import Instance, Scene

_STAR_INNER = 0.5  # inner / outer radius of the five-pointed star
_SQUARE_SIDE = 0.86  # side of a square as a fraction of the extent (its area then matches a circle's)
_TRIANGLE_HEIGHT = 0.9  # height of the upright triangle as a fraction of its base (= the extent)


def background(scene: Scene) -> np.ndarray:
    """The background at 64x64 as float RGB in [0, 1], before lighting."""
    n = V.IMAGE_SIZE
    t = (np.arange(n, dtype=np.float32) + 0.5) / n  # pixel centers in (0, 1)
    depth = V.GRADIENT_DEPTH
    if scene.style == "plain":
        f = np.ones((n, n), np.float32)
    elif scene.style == "vertical gradient":
        ramp = t if scene.light_first else 1 - t
        f = np.repeat((1 - depth * ramp)[:, None], n, axis=1)
    elif scene.style == "horizontal gradient":
        ramp = t if scene.light_first else 1 - t
        f = np.repeat((1 - depth * ramp)[None, :], n, axis=0)
    elif scene.style == "vignette":
        r2 = ((t[None, :] - 0.5) ** 2 + (t[:, None] - 0.5) ** 2) / 0.5  # 0 at the center, ~1 at corners
        f = 1 - depth * r2
    else:
        raise ValueError(f"unknown style {scene.style!r}; known: {V.STYLES}")
    return f[..., None] * np.asarray(scene.tint, np.float32)[None, None, :]


def shape_outline(shape: str, cx: float, cy: float, ext: float) -> list[tuple[float, float]] | None:
    """Polygon vertices of ``shape`` filling a box of side ``ext`` centered at (cx, cy); None for a circle."""
    if shape == "circle":
        return None
    if shape == "square":
        h = ext * _SQUARE_SIDE / 2
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        half, height = ext / 2, ext * _TRIANGLE_HEIGHT
        return [(cx, cy - height / 2), (cx + half, cy + height / 2), (cx - half, cy + height / 2)]
    if shape == "star":
        outer = ext / (2 * math.sin(math.radians(72)))  # the star's width equals the extent
        height = outer * (1 + math.cos(math.radians(36)))
        oy = cy - height / 2 + outer  # star center, so that its box is centered on cy
        points = []
        for k in range(10):
            r = outer if k % 2 == 0 else outer * _STAR_INNER
            a = math.radians(-90 + 36 * k)
            points.append((cx + r * math.cos(a), oy + r * math.sin(a)))
        return points
    raise ValueError(f"unknown shape {shape!r}; known: {V.SHAPES}")


def outline_width(ext: float) -> float:
    """Outline width (px) of an outlined object of extent ``ext``."""
    return max(V.OUTLINE_MIN_PX, V.OUTLINE_FRACTION * ext)


def object_alpha(inst: Instance) -> tuple[np.ndarray, int, int]:
    """Coverage of one object: an (h, w) float array in [0, 1] and its top-left pixel (x0, y0)."""
    s = V.SUPERSAMPLE
    x0 = int(math.floor(inst.cx - inst.extent / 2)) - 2
    y0 = int(math.floor(inst.cy - inst.extent / 2)) - 2
    size = int(math.ceil(inst.extent)) + 5
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, ext = (inst.cx - x0) * s, (inst.cy - y0) * s, inst.extent * s
    poly = shape_outline(inst.shape, cx, cy, ext)
    if poly is None:
        draw.ellipse([cx - ext / 2, cy - ext / 2, cx + ext / 2, cy + ext / 2], fill=255)
    else:
        draw.polygon(poly, fill=255)
    mask = np.asarray(canvas) > 127  # binary at 4x
    if inst.material == "outlined":
        # Outline = the pixels within the outline width of the shape's edge (an exact inward offset).
        depth = distance_transform_edt(mask)
        mask = mask & (depth <= outline_width(inst.extent) * s)
    elif inst.material != "solid":
        raise ValueError(f"unknown material {inst.material!r}; known: {V.MATERIALS}")
    alpha = mask.reshape(size, s, size, s).mean(axis=(1, 3), dtype=np.float32)  # box filter 4x -> 1x
    return alpha, x0, y0


def render_float(scene: Scene) -> np.ndarray:
    """Render to float RGB in [0, 1], shape (64, 64, 3)."""
    img = background(scene)
    n = V.IMAGE_SIZE
    for inst in scene.instances:
        alpha, x0, y0 = object_alpha(inst)
        h, w = alpha.shape
        xs, ys = max(0, -x0), max(0, -y0)
        xe, ye = min(w, n - x0), min(h, n - y0)
        a = alpha[ys:ye, xs:xe, None]
        region = img[y0 + ys : y0 + ye, x0 + xs : x0 + xe]
        color = np.asarray(V.COLORS[inst.color], np.float32)
        region[...] = region * (1 - a) + color * a
    img *= V.LIGHTING[scene.lighting]
    return np.clip(img, 0.0, 1.0)


def render(scene: Scene) -> np.ndarray:
    """Render to uint8 RGB, shape (64, 64, 3)."""
    return (render_float(scene) * 255.0 + 0.5).astype(np.uint8)


def render_pil(scene: Scene) -> Image.Image:
    return Image.fromarray(render(scene), "RGB")


def degrade(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Degrade a uint8 RGB image: ``none`` or ``blur-noise`` (Gaussian blur sigma 0.8 px + noise sigma 8/255)."""
    if kind == "none":
        return image
    if kind == "blur-noise":
        from scipy.ndimage import gaussian_filter

        x = image.astype(np.float32) / 255.0
        x = gaussian_filter(x, sigma=(0.8, 0.8, 0), mode="nearest")
        x = x + rng.normal(0.0, 8.0 / 255.0, size=x.shape).astype(np.float32)
        return (np.clip(x, 0, 1) * 255.0 + 0.5).astype(np.uint8)
    raise ValueError(f"unknown degradation {kind!r}; known: none, blur-noise")
