"""Scenes of the toy world: what a plan says (`SceneSpec`) and what gets drawn (`Scene`).

A `SceneSpec` is the meaning of a toy plan: object groups (shape, color, size, count, regions), the
background style, lighting, camera and material. ``spec.to_plan()`` and ``SceneSpec.from_plan(plan)`` are
exact inverses. A `Scene` is one concrete picture of a spec: pixel centers with a little jitter, the
background tint and gradient direction; ``scene.to_spec()`` recovers the spec exactly.

Object placement follows fixed arrangements, so a prompt determines its plan: one object sits in a named
region (center by default); two sit side by side (first mentioned on the left) or stacked; three make a
triangle (two on top, one below); four a 2x2 grid, filled in mention order.
"""

from __future__ import annotations

import colorsys
import json
from dataclasses import asdict, dataclass, field

import numpy as np

from planner.schema import Plan, PlanError, PlanObject
from toyworld import vocab as V

# Arrangements: name -> slot regions and slot centers (pixels); the largest object extent that still
# leaves a clear gap between neighbours.
ARRANGEMENTS: dict[str, dict] = {
    "side by side": {"slots": {"left": (16.0, 32.0), "right": (48.0, 32.0)}, "max_extent": 28.0},
    "stacked": {"slots": {"top": (32.0, 16.0), "bottom": (32.0, 48.0)}, "max_extent": 28.0},
    "triangle": {
        "slots": {"top left": (16.0, 16.0), "top right": (48.0, 16.0), "bottom": (32.0, 48.0)},
        "max_extent": 28.0,
    },
    "grid": {
        "slots": {
            "top left": (16.0, 16.0),
            "top right": (48.0, 16.0),
            "bottom left": (16.0, 48.0),
            "bottom right": (48.0, 48.0),
        },
        "max_extent": 28.0,
    },
}
SINGLE_MAX_EXTENT = 30.0
MIN_GAP = 3.0  # px between the bounding boxes of any two objects
MAX_JITTER = 3.0  # px


def object_extent(size: str, camera: str) -> float:
    """Extent (px, the side of the box the shape fills) of an object of ``size`` seen at ``camera``."""
    return V.SIZES[size] * V.CAMERA[camera]


@dataclass(frozen=True)
class SceneSpec:
    """The meaning of a toy plan. ``objects`` are groups in mention order, each fully specified."""

    objects: tuple[PlanObject, ...]
    style: str = V.DEFAULT_STYLE
    lighting: str = V.DEFAULT_LIGHTING
    camera: str = V.DEFAULT_CAMERA
    material: str = V.DEFAULT_MATERIAL

    def __post_init__(self) -> None:
        self.check()

    # -------------------------------------------------------------- checks
    def check(self) -> None:
        """Raise `ValueError` if the spec cannot be drawn (unknown words, bad arrangement, too big)."""
        if self.style not in V.STYLES or self.lighting not in V.LIGHTING or self.camera not in V.CAMERA:
            raise ValueError(f"unknown style/lighting/camera in {self.style!r}/{self.lighting!r}/{self.camera!r}")
        if self.material not in V.MATERIALS:
            raise ValueError(f"unknown material {self.material!r}")
        if not self.objects:
            raise ValueError("a scene needs at least one object")
        seen = set()
        for o in self.objects:
            if o.name not in V.SHAPES or o.color not in V.COLORS or o.size not in V.SIZES:
                raise ValueError(f"object {o} has an unknown shape, color or size")
            if o.material not in (None, self.material):
                raise ValueError(f"object {o} has material {o.material!r}; toy scenes have one material")
            if len(o.positions) != o.count:
                raise ValueError(f"object {o} needs one position per instance")
            key = (o.name, o.color, o.size)
            if key in seen:
                raise ValueError(f"two groups of {key}: merge them into one with a count")
            seen.add(key)
        n = self.n_instances
        if n > V.MAX_OBJECTS:
            raise ValueError(f"{n} instances (max {V.MAX_OBJECTS})")
        positions = [p for o in self.objects for p in o.positions]
        arrangement = self.arrangement
        if arrangement == "single":
            if positions[0] not in V.REGIONS:
                raise ValueError(f"unknown region {positions[0]!r}")
            max_extent = SINGLE_MAX_EXTENT
        else:
            slots = ARRANGEMENTS[arrangement]["slots"]
            if n > 2 and positions != list(slots):
                raise ValueError(f"{arrangement} is filled in mention order {list(slots)}, got {positions}")
            max_extent = ARRANGEMENTS[arrangement]["max_extent"]
        for o in self.objects:
            ext = object_extent(o.size, self.camera)
            if ext > max_extent:
                raise ValueError(f"{o.size} objects at {self.camera} shot ({ext:.1f}px) do not fit a {arrangement}")

    @property
    def n_instances(self) -> int:
        return sum(o.count for o in self.objects)

    @property
    def arrangement(self) -> str:
        """``single``, ``side by side``, ``stacked``, ``triangle`` or ``grid``, read off the positions."""
        positions = [p for o in self.objects for p in o.positions]
        n = len(positions)
        if n == 1:
            return "single"
        if n == 2:
            if sorted(positions) == ["left", "right"]:
                return "side by side"
            if sorted(positions) == ["bottom", "top"]:
                return "stacked"
            raise ValueError(f"two objects must be left/right or top/bottom, got {positions}")
        return "triangle" if n == 3 else "grid"

    # -------------------------------------------------------------- plan <-> spec
    def layout_text(self) -> str:
        n = self.n_instances
        arrangement = self.arrangement
        if arrangement == "single":
            return f"1 object, {self.objects[0].positions[0]}"
        words = {"triangle": "in a triangle", "grid": "in a grid"}
        return f"{n} objects, {words.get(arrangement, arrangement)}"

    def to_plan(self) -> Plan:
        """The canonical plan of this spec (every field filled, defaults spelled out)."""
        colors: list[str] = []
        for o in self.objects:
            if o.color not in colors:
                colors.append(o.color)
        return Plan.from_objects(
            [PlanObject(o.name, o.count, o.size, o.color, None, o.positions) for o in self.objects],
            style=V.STYLE_TEXT[self.style],
            layout=self.layout_text(),
            color=", ".join(colors),
            material=V.MATERIAL_TEXT[self.material],
            lighting=V.LIGHTING_TEXT[self.lighting],
            camera=V.CAMERA_TEXT[self.camera],
        )

    @classmethod
    def from_plan(cls, plan: Plan) -> SceneSpec:
        """The spec a structured toy plan describes; `PlanError` if the plan is not a drawable toy plan."""
        plan.validate(V.TOY_PLAN_SPEC)
        objects = plan.structured_objects(V.OBJECT_GRAMMAR)
        inverse = {
            "STYLE": {t: k for k, t in V.STYLE_TEXT.items()},
            "LIGHTING": {t: k for k, t in V.LIGHTING_TEXT.items()},
            "CAMERA": {t: k for k, t in V.CAMERA_TEXT.items()},
            "MATERIAL": {t: k for k, t in V.MATERIAL_TEXT.items()},
        }
        for o in objects:
            if o.color is None or o.size is None or not o.positions:
                raise PlanError(f"'{o.to_text()}' needs a size, a color and positions to be drawn", "OBJECT")
        try:
            spec = cls(
                objects=tuple(PlanObject(o.name, o.count, o.size, o.color, None, o.positions) for o in objects),
                style=inverse["STYLE"][plan.style],
                lighting=inverse["LIGHTING"][plan.lighting],
                camera=inverse["CAMERA"][plan.camera],
                material=inverse["MATERIAL"][plan.material],
            )
        except ValueError as err:
            raise PlanError(f"describes no drawable scene: {err}", "OBJECT") from None
        expected = spec.to_plan()
        for name in ("LAYOUT", "COLOR"):
            if plan.get(name) != expected.get(name):
                raise PlanError(f"'{plan.get(name)}' contradicts the objects (expected '{expected.get(name)}')", name)
        return spec

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SceneSpec:
        objects = tuple(PlanObject(**{**o, "positions": tuple(o.get("positions", ()))}) for o in data["objects"])
        return cls(objects=objects, **{k: v for k, v in data.items() if k != "objects"})


@dataclass(frozen=True)
class Instance:
    """One drawn object: shape, color, size word, material, center (px) and extent (px)."""

    shape: str
    color: str
    size: str
    material: str
    cx: float
    cy: float
    extent: float


@dataclass(frozen=True)
class Scene:
    """A concrete picture: instances plus the background (tint of its light end, gradient direction)."""

    instances: tuple[Instance, ...]
    style: str
    lighting: str
    camera: str
    material: str
    tint: tuple[float, float, float]  # RGB of the light end of the background, before lighting
    light_first: bool = True  # gradients: light end at top (vertical) / left (horizontal)
    spec: SceneSpec | None = field(default=None, compare=False, repr=False)

    def to_spec(self) -> SceneSpec:
        """Recover the spec: group consecutive instances of equal (shape, color, size), regions from centers."""
        groups: list[list[Instance]] = []
        for inst in self.instances:
            if groups and (groups[-1][0].shape, groups[-1][0].color, groups[-1][0].size) == (
                inst.shape,
                inst.color,
                inst.size,
            ):
                groups[-1].append(inst)
            else:
                groups.append([inst])
        objects = tuple(
            PlanObject(g[0].shape, len(g), g[0].size, g[0].color, None, tuple(V.region_of(i.cx, i.cy) for i in g))
            for g in groups
        )
        return SceneSpec(objects, self.style, self.lighting, self.camera, self.material)

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("spec", None)
        return data

    @classmethod
    def from_json(cls, data: dict | str) -> Scene:
        if isinstance(data, str):
            data = json.loads(data)
        return cls(
            instances=tuple(Instance(**i) for i in data["instances"]),
            style=data["style"],
            lighting=data["lighting"],
            camera=data["camera"],
            material=data["material"],
            tint=tuple(data["tint"]),
            light_first=data.get("light_first", True),
        )


def sample_tint(rng: np.random.Generator) -> tuple[float, float, float]:
    """A low-saturation background tint (light end, before lighting)."""
    h = rng.uniform(0, 1)
    s = rng.uniform(0, V.BACKGROUND_SATURATION_MAX)
    v = rng.uniform(*V.BACKGROUND_VALUE_RANGE)
    return tuple(float(c) for c in colorsys.hsv_to_rgb(h, s, v))


def spec_to_scene(spec: SceneSpec, rng: np.random.Generator) -> Scene:
    """Place the spec's objects (slot centers plus jitter that keeps gaps and regions) and pick a tint."""
    arrangement = spec.arrangement
    extents = [object_extent(o.size, spec.camera) for o in spec.objects for _ in range(o.count)]
    positions = [p for o in spec.objects for p in o.positions]
    if arrangement == "single":
        centers = [V.REGION_CENTERS[positions[0]]]
        slack = MAX_JITTER
    else:
        info = ARRANGEMENTS[arrangement]
        centers = [info["slots"][p] for p in positions]
        # two boxes are apart when they are apart along either axis: Chebyshev distance of centers
        spacing = min(max(abs(a[0] - b[0]), abs(a[1] - b[1])) for i, a in enumerate(centers) for b in centers[i + 1 :])
        slack = max(0.0, (spacing - max(extents) - MIN_GAP) / 2)
    instances = []
    k = 0
    for o in spec.objects:
        for _ in range(o.count):
            ext = extents[k]
            cx, cy = centers[k]
            lim = min(MAX_JITTER, slack)
            jx, jy = rng.uniform(-lim, lim, size=2)
            half = ext / 2 + 1.0  # keep one pixel of background at the canvas edge
            cx = float(np.clip(cx + jx, half, V.IMAGE_SIZE - half))
            cy = float(np.clip(cy + jy, half, V.IMAGE_SIZE - half))
            if V.region_of(cx, cy) != positions[k]:  # a jitter never moves an object out of its region
                cx, cy = centers[k]
            instances.append(Instance(o.name, o.color, o.size, spec.material, cx, cy, ext))
            k += 1
    return Scene(
        instances=tuple(instances),
        style=spec.style,
        lighting=spec.lighting,
        camera=spec.camera,
        material=spec.material,
        tint=sample_tint(rng),
        light_first=bool(rng.integers(0, 2)),
        spec=spec,
    )


# ---------------------------------------------------------------------------------------------------------------
# Samplers of specs. ``kind`` says what a prompt talks about; the grammar has families for each kind.
KINDS = ("single", "region", "pair", "relation", "count", "mixed")
RELATIONS = {
    "left of": ("left", "right"),
    "right of": ("right", "left"),
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
}


@dataclass(frozen=True)
class SpecDraw:
    """A sampled spec plus what the prompt must say about it: its kind and, for relations, which one."""

    spec: SceneSpec
    kind: str
    relation: str | None = None


def _pick(rng: np.random.Generator, items, p=None):
    items = list(items)
    return items[int(rng.choice(len(items), p=p))]


def sample_fields(rng: np.random.Generator, p_non_default: float = 0.45) -> dict[str, str]:
    """Style, lighting, camera, material: each at its default with probability ``1 - p_non_default``."""

    def draw(options, default):
        if rng.uniform() >= p_non_default:
            return default
        return _pick(rng, [o for o in options if o != default])

    return {
        "style": draw(V.STYLES, V.DEFAULT_STYLE),
        "lighting": draw(V.LIGHTING, V.DEFAULT_LIGHTING),
        "camera": draw(V.CAMERA, V.DEFAULT_CAMERA),
        "material": draw(V.MATERIALS, V.DEFAULT_MATERIAL),
    }


def sample_spec(
    rng: np.random.Generator,
    kind: str | None = None,
    *,
    p_color: float = 0.6,
    p_size: float = 0.25,
    p_field: float = 0.45,
    default_fields: bool = False,
    max_tries: int = 100,
) -> SpecDraw:
    """Sample a drawable spec of ``kind`` (random kind if None).

    ``p_color``: chance an object gets a random color rather than its shape's default; ``p_size``: chance
    of a non-medium size; ``p_field``: chance each scene field is not at its default (all defaults when
    ``default_fields``).
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; known: {KINDS}")
    for _ in range(max_tries):
        k = kind or _pick(rng, KINDS, p=[0.22, 0.1, 0.2, 0.2, 0.16, 0.12])
        fields = sample_fields(rng, 0.0 if default_fields else p_field)

        def obj(shape: str, count: int, positions: tuple[str, ...], size: str | None = None) -> PlanObject:
            color = _pick(rng, V.COLORS) if rng.uniform() < p_color else V.DEFAULT_COLOR[shape]
            if size is None:
                size = _pick(rng, [s for s in V.SIZES if s != V.DEFAULT_SIZE]) if rng.uniform() < p_size else "medium"
            return PlanObject(shape, count, size, color, None, positions)

        relation = None
        if k == "single":
            objects = (obj(_pick(rng, V.SHAPES), 1, ("center",)),)
        elif k == "region":
            objects = (obj(_pick(rng, V.SHAPES), 1, (_pick(rng, [r for r in V.REGIONS if r != "center"]),)),)
        elif k in ("pair", "relation"):
            a, b = rng.permutation(len(V.SHAPES))[:2]
            relation = _pick(rng, RELATIONS) if k == "relation" else "left of"
            pa, pb = RELATIONS[relation]
            objects = (obj(V.SHAPES[a], 1, (pa,)), obj(V.SHAPES[b], 1, (pb,)))
        elif k == "count":
            n = int(rng.integers(2, V.MAX_OBJECTS + 1))
            objects = (obj(_pick(rng, V.SHAPES), n, default_slots(n)),)
        else:  # mixed: two groups, 3 or 4 instances, filled in mention order
            n = int(rng.integers(3, V.MAX_OBJECTS + 1))
            n_first = int(rng.integers(1, n))
            a, b = rng.permutation(len(V.SHAPES))[:2]
            slots = default_slots(n)
            objects = (obj(V.SHAPES[a], n_first, slots[:n_first]), obj(V.SHAPES[b], n - n_first, slots[n_first:]))
        try:
            spec = SceneSpec(objects, **fields)
        except ValueError:
            continue  # e.g. large objects at close-up do not fit a grid: draw again
        return SpecDraw(spec, k, relation if k == "relation" else None)
    raise RuntimeError(f"could not sample a drawable {kind} spec in {max_tries} tries")


def sample_stacked(rng: np.random.Generator, max_tries: int = 100, **kwargs) -> SpecDraw:
    """Two objects of one kind stacked (top, bottom): kind ``stacked``, said by wide grammar families only
    ("two circles, one on top of the other"); ``kwargs`` go to `sample_spec` for the object and fields."""
    for _ in range(max_tries):
        draw = sample_spec(rng, "single", **kwargs)
        o = draw.spec.objects[0]
        fields = {k: getattr(draw.spec, k) for k in ("style", "lighting", "camera", "material")}
        try:
            spec = SceneSpec((PlanObject(o.name, 2, o.size, o.color, None, ("top", "bottom")),), **fields)
        except ValueError:
            continue  # large objects at close-up do not fit a stack: draw again
        return SpecDraw(spec, "stacked")
    raise RuntimeError(f"could not sample a drawable stacked spec in {max_tries} tries")


def default_slots(n: int) -> tuple[str, ...]:
    """Regions of ``n`` objects placed by convention (mention order)."""
    return {
        1: ("center",),
        2: ("left", "right"),
        3: tuple(ARRANGEMENTS["triangle"]["slots"]),
        4: tuple(ARRANGEMENTS["grid"]["slots"]),
    }[n]
