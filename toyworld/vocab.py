"""The words of the toy world and what each one means in pixels.

Every plan field maps to something a checker can measure: STYLE -> background kind, LIGHTING -> global
brightness, CAMERA -> object scale, MATERIAL -> fill (solid / outlined). The shape and color words are
the ``class`` and ``color`` strings of ShapesEval's metadata.
"""

from __future__ import annotations

from planner.schema import ObjectGrammar, PlanError, PlanSpec

IMAGE_SIZE = 64  # pixels, square
SUPERSAMPLE = 4  # the renderer draws at 4x and box-filters down (anti-aliasing)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
# Saturated colors spread over the hue circle (degrees: 0, 30, 60, 125, 225, 280), so that hue alone
# names the color whatever the lighting.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "orange": (0.98, 0.52, 0.04),
    "yellow": (0.92, 0.90, 0.08),
    "green": (0.10, 0.70, 0.16),
    "blue": (0.10, 0.30, 0.92),
    "purple": (0.60, 0.12, 0.88),
}
# A shape named without a color has its own color (like "a banana" is yellow): prompts stay unambiguous.
DEFAULT_COLOR: dict[str, str] = {"circle": "red", "square": "blue", "triangle": "green", "star": "yellow"}

SIZES: dict[str, float] = {"small": 16.0, "medium": 20.0, "large": 24.0}  # object extent in px at medium shot
DEFAULT_SIZE = "medium"

# 3x3 regions of the canvas; the name of a region is where an object's center lies.
REGIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
REGION_CENTERS: dict[str, tuple[float, float]] = {
    name: (16.0 + 16.0 * (i % 3), 16.0 + 16.0 * (i // 3)) for i, name in enumerate(REGIONS)
}
REGION_EDGES = (24.0, 40.0)  # x (or y) below the first edge is left (top), above the second is right (bottom)

# STYLE -> background kind. Backgrounds stay low-frequency (flat tints, gradients): a 64x64 world is
# judged on composition, and fine texture would cost a small VAE most of its capacity.
STYLES: tuple[str, ...] = ("plain", "vertical gradient", "horizontal gradient", "vignette")
DEFAULT_STYLE = "plain"
GRADIENT_DEPTH = 0.45  # the dark end of a gradient / vignette is (1 - depth) x the light end

# LIGHTING -> global brightness factor on the whole image.
LIGHTING: dict[str, float] = {"dim": 0.5, "normal": 0.75, "bright": 1.0}
DEFAULT_LIGHTING = "normal"

# CAMERA -> object scale factor.
CAMERA: dict[str, float] = {"wide": 0.8, "medium": 1.0, "close-up": 1.25}
DEFAULT_CAMERA = "medium"

# MATERIAL -> fill.
MATERIALS: tuple[str, ...] = ("solid", "outlined")
DEFAULT_MATERIAL = "solid"
OUTLINE_FRACTION = 0.14  # outline width as a fraction of the object extent ...
OUTLINE_MIN_PX = 2.0  # ... but never thinner than this

# Background tints: low saturation (<= 0.12) so objects stand out by saturation; brightness (HSV value)
# of the light end of the background, before lighting, in [0.88, 0.97].
BACKGROUND_VALUE_RANGE = (0.88, 0.97)
BACKGROUND_SATURATION_MAX = 0.12

# Plan texts of the scene-level fields.
STYLE_TEXT = {s: f"{s} background" for s in STYLES}
LIGHTING_TEXT = {k: f"{k} light" for k in LIGHTING}
CAMERA_TEXT = {k: f"{k} shot" for k in CAMERA}
MATERIAL_TEXT = {k: k for k in MATERIALS}

MAX_OBJECTS = 4  # instances per scene

OBJECT_GRAMMAR = ObjectGrammar(
    names=frozenset(SHAPES),
    colors=frozenset(COLORS),
    sizes=frozenset(SIZES),
    materials=frozenset(MATERIALS),
    positions=frozenset(REGIONS),
    max_count=MAX_OBJECTS,
)

PLAN_DEFAULTS = {
    "STYLE": STYLE_TEXT[DEFAULT_STYLE],
    "MATERIAL": MATERIAL_TEXT[DEFAULT_MATERIAL],
    "LIGHTING": LIGHTING_TEXT[DEFAULT_LIGHTING],
    "CAMERA": CAMERA_TEXT[DEFAULT_CAMERA],
}


def derive_plan_fields(fields: list[tuple[str, str]]) -> dict[str, str]:
    """LAYOUT and COLOR of a toy plan follow from its objects (used by `repair_plan` to fill them in)."""
    from toyworld.scene import SceneSpec  # scene builds on this module

    objects = [t for n, t in fields if n == "OBJECT"]
    parsed = [OBJECT_GRAMMAR.parse(t) for t in objects]
    try:
        spec = SceneSpec(tuple(parsed))
    except ValueError as err:
        raise PlanError(f"objects describe no drawable scene: {err}", "OBJECT") from None
    plan = spec.to_plan()
    return {"LAYOUT": plan.layout, "COLOR": plan.color}


TOY_PLAN_SPEC = PlanSpec(
    max_field_tokens=24,
    max_total_tokens=120,
    max_objects=MAX_OBJECTS,
    vocab={
        "STYLE": frozenset(STYLE_TEXT.values()),
        "LIGHTING": frozenset(LIGHTING_TEXT.values()),
        "CAMERA": frozenset(CAMERA_TEXT.values()),
        "MATERIAL": frozenset(MATERIAL_TEXT.values()),
    },
    object_grammar=OBJECT_GRAMMAR,
    defaults=PLAN_DEFAULTS,
    derive=derive_plan_fields,
)


def region_of(x: float, y: float) -> str:
    """Name of the 3x3 region that holds the point ``(x, y)`` (pixels, origin top left)."""
    lo, hi = REGION_EDGES
    col = 0 if x < lo else (2 if x >= hi else 1)
    row = 0 if y < lo else (2 if y >= hi else 1)
    return REGIONS[3 * row + col]
