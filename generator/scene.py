"""Scene stage: a renderer-independent description of camera, lights, background and occluders.

Everything here is plain numpy and deterministic given the rng, so a sample can be described (and its
metadata written) without Blender. Coordinates are the body model's world frame: metres, y up, the person
standing on the ground plane y = 0. The camera follows OpenCV: x right, y down, z forward,
pixel ~ K (R X + t). The output image is a person crop (re-identification style): the full camera view is
computed first, then a crop box around the projected person, and K is the intrinsics of the crop itself.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protoreg.dataset import to_jsonable

JSON_DIGITS = 7  # decimals kept in sample metadata

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".exr", ".hdr", ".webp")
PATTERNS = ("solid", "noise", "checker", "brick")
OCCLUDER_SHAPES = ("box", "cylinder", "sphere")

Range = tuple[float, float]
Color = tuple[float, float, float]

# Linear-RGB palettes: outdoor and indoor surfaces people are seen on and against.
GROUND_PALETTE: tuple[Color, ...] = (
    (0.05, 0.05, 0.055),  # asphalt
    (0.12, 0.12, 0.11),  # worn asphalt
    (0.30, 0.29, 0.26),  # concrete
    (0.45, 0.42, 0.36),  # light paving
    (0.06, 0.12, 0.03),  # grass
    (0.16, 0.10, 0.05),  # dirt
    (0.35, 0.25, 0.15),  # sand
    (0.25, 0.08, 0.05),  # red brick paving
    (0.55, 0.55, 0.55),  # tiles
    (0.20, 0.13, 0.07),  # wooden floor
)
BACKDROP_PALETTE: tuple[Color, ...] = (
    (0.60, 0.58, 0.52),  # plaster
    (0.30, 0.30, 0.32),  # grey wall
    (0.30, 0.10, 0.06),  # brick
    (0.08, 0.10, 0.15),  # glass facade
    (0.70, 0.70, 0.72),  # white wall
    (0.35, 0.28, 0.18),  # wood
    (0.05, 0.15, 0.05),  # hedge
    (0.40, 0.20, 0.10),  # terracotta
    (0.10, 0.20, 0.35),  # painted blue
    (0.50, 0.45, 0.15),  # painted yellow
)
OCCLUDER_PALETTE: tuple[Color, ...] = (
    (0.50, 0.05, 0.04),
    (0.05, 0.20, 0.50),
    (0.40, 0.40, 0.40),
    (0.05, 0.05, 0.05),
    (0.60, 0.45, 0.10),
    (0.10, 0.30, 0.10),
    (0.70, 0.70, 0.68),
)


@dataclass
class SceneConfig:
    """Distribution of cameras, lighting, backgrounds and occluders. Ranges are (lo, hi), drawn uniformly."""

    # --- camera ---
    camera_distance: Range = (2.0, 15.0)  # horizontal distance camera -> person (m)
    camera_height: Range = (0.5, 6.0)  # camera height above the ground (m); high = surveillance views
    camera_azimuth_deg: Range = (0.0, 360.0)  # around the person; 0 = in front of the (unrotated) body (+z)
    camera_roll_deg: Range = (-3.0, 3.0)  # small roll of a hand-held or badly mounted camera
    aim_jitter: float = 0.1  # std (m) of the look-at point around the person's centre
    focal_length_mm: Range = (24.0, 85.0)  # lens focal length on the sensor below
    # a lens is shortened (down to this) until the crop around the person fits the full view
    min_focal_length_mm: float = 12.0
    sensor_width_mm: float = 36.0  # full-frame sensor width; square pixels
    full_resolution: tuple[int, int] = (1920, 1080)  # full camera image (W, H) the crop box refers to
    crop_margin: Range = (0.03, 0.12)  # margin on each side of the person's box, fraction of the crop height
    crop_shift: float = 0.03  # max shift of the person inside the crop, fraction of the crop size
    # --- lighting ---
    sun_strength: Range = (1.5, 4.5)  # sun irradiance (W/m^2, Cycles units)
    sun_elevation_deg: Range = (15.0, 80.0)  # sun height above the horizon
    sun_azimuth_deg: Range = (0.0, 360.0)  # sun direction around the vertical axis
    sun_angle_deg: Range = (0.5, 8.0)  # apparent sun diameter: larger = softer shadows (haze)
    sun_warmth: Range = (0.0, 0.25)  # how far the sun colour goes from white to warm orange
    sky_strength: Range = (0.4, 1.4)  # ambient sky brightness (gradient world)
    # sky palettes (linear RGB), clear / hazy / overcast; zenith k goes with horizon k
    sky_zenith_colors: tuple[Color, ...] = ((0.15, 0.3, 0.8), (0.35, 0.45, 0.7), (0.5, 0.5, 0.55))
    sky_horizon_colors: tuple[Color, ...] = ((0.7, 0.8, 0.95), (0.8, 0.8, 0.8), (0.9, 0.75, 0.6))
    area_light_probability: float = 0.35  # chance of extra area lights (street lamps, windows)
    area_light_count: tuple[int, int] = (1, 2)  # how many, inclusive
    area_light_strength: Range = (100.0, 800.0)  # power (W)
    area_light_size: Range = (0.5, 2.0)  # square edge (m)
    area_light_distance: Range = (2.0, 5.0)  # from the person's centre (m)
    exposure_ev: Range = (-0.4, 0.4)  # camera exposure change (stops) applied to the linear image
    # --- background ---
    # folder of images for the backdrop (--backgrounds); None = procedural backgrounds only
    backgrounds_dir: str | None = None
    # with backgrounds_dir: share of samples showing an image backdrop (the rest are procedural)
    background_image_probability: float = 1.0
    backdrop_probability: float = 0.75  # procedural backdrop wall behind the person (else open ground + sky)
    backdrop_distance: Range = (1.0, 8.0)  # behind the person, along the camera's view (m)
    ground_patterns: tuple[str, ...] = PATTERNS  # solid / noise / checker / brick
    backdrop_patterns: tuple[str, ...] = PATTERNS
    pattern_scale: Range = (0.2, 2.0)  # size of one texture cell (m)
    pattern_contrast: Range = (0.2, 0.8)  # how different the second pattern colour is from the first
    surface_roughness: Range = (0.4, 1.0)  # principled roughness of ground and backdrop
    ground_palette: tuple[Color, ...] = GROUND_PALETTE
    backdrop_palette: tuple[Color, ...] = BACKDROP_PALETTE
    color_jitter: float = 0.15  # relative per-channel jitter of palette colours
    # --- occluders (label 15) ---
    occluder_probability: float = 0.3  # chance that a sample has occluders
    occluder_count: tuple[int, int] = (1, 1)  # how many, inclusive (the renderer pools OCCLUDER_POOL_SIZE)
    occluder_shapes: tuple[str, ...] = OCCLUDER_SHAPES
    occluder_size: Range = (0.12, 0.3)  # size, fraction of the person's height as seen from the camera
    occluder_depth: Range = (0.3, 0.8)  # position along camera -> person, fraction of the distance
    # offset of the occluder's centre from the person's centre, fraction of half the person's box
    occluder_offset: Range = (0.5, 1.0)
    occluder_palette: tuple[Color, ...] = OCCLUDER_PALETTE


OCCLUDER_POOL_SIZE = 3  # occluder objects the renderer keeps; occluder_count is capped at this


@dataclass
class CameraSpec:
    """Camera of one sample: OpenCV K (of the output crop), R, t in the body's y-up world frame."""

    K: np.ndarray  # (3, 3) intrinsics of the output image (pixel centres at integer coordinates)
    R: np.ndarray  # (3, 3) world -> camera rotation
    t: np.ndarray  # (3,) world -> camera translation
    width: int  # output image size (pixels)
    height: int
    full_K: np.ndarray  # (3, 3) intrinsics of the full camera image
    full_width: int
    full_height: int
    crop_box: np.ndarray  # (4,) x0, y0, x1, y1 of the crop in full-image pixel coordinates (pixel edges)
    focal_length_mm: float  # lens of the full camera
    sensor_width_mm: float
    position: np.ndarray  # (3,) camera centre in the world
    distance: float  # horizontal distance to the person (m)
    height_above_ground: float
    azimuth_deg: float
    roll_deg: float

    def cam_to_world(self) -> np.ndarray:
        """4x4 pose of a Blender-style camera (looks down -z, y up) in the body's world frame."""
        m = np.eye(4)
        m[:3, :3] = self.R.T @ np.diag([1.0, -1.0, -1.0])
        m[:3, 3] = self.position
        return m

    def blender_lens(self) -> dict[str, float]:
        """Lens, sensor and shift that make a Blender camera (horizontal sensor fit) reproduce K."""
        fx = float(self.K[0, 0])
        w, h = self.width, self.height
        sensor = self.sensor_width_mm
        return {
            "lens": fx * sensor / w,
            "sensor_width": sensor,
            # Blender shifts in units of the fitted (horizontal) image size; its pixel centres sit at i + 0.5.
            "shift_x": (w / 2.0 - 0.5 - float(self.K[0, 2])) / w,
            "shift_y": (float(self.K[1, 2]) - h / 2.0 + 0.5) / w,
        }

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World points (N, 3) -> pixel coordinates (N, 2) of the output image and camera depth (N,)."""
        cam = points @ self.R.T + self.t
        z = cam[:, 2]
        uvw = cam @ self.K.T
        return uvw[:, :2] / uvw[:, 2:3], z


@dataclass
class SunSpec:
    direction: np.ndarray  # (3,) unit vector from the scene towards the sun
    strength: float
    angle_deg: float
    color: np.ndarray  # (3,) linear RGB


@dataclass
class SkySpec:
    zenith_color: np.ndarray  # (3,) linear RGB
    horizon_color: np.ndarray
    strength: float


@dataclass
class AreaLightSpec:
    position: np.ndarray  # (3,) centre of the square light
    target: np.ndarray  # (3,) point it faces
    strength: float  # W
    size: float  # m
    color: np.ndarray


@dataclass
class SurfaceSpec:
    """A procedural material: two colours mixed by a pattern."""

    pattern: str  # one of PATTERNS
    color_a: np.ndarray
    color_b: np.ndarray
    scale: float  # cell size (m)
    roughness: float
    rotation_deg: float  # of the pattern about the surface normal


@dataclass
class BackdropSpec:
    """A vertical-ish wall behind the person, facing the camera, covering the crop's view."""

    center: np.ndarray  # (3,)
    normal: np.ndarray  # (3,) towards the camera
    up: np.ndarray  # (3,) in-plane up direction
    width: float  # m
    height: float
    surface: SurfaceSpec | None  # procedural, or
    image: str | None  # an image file from backgrounds_dir


@dataclass
class BackgroundSpec:
    ground: SurfaceSpec
    backdrop: BackdropSpec | None


@dataclass
class OccluderSpec:
    shape: str  # one of OCCLUDER_SHAPES
    center: np.ndarray  # (3,)
    size: np.ndarray  # (3,) extent along the object's own axes (m)
    rotation: np.ndarray  # (3, 3) object -> world
    color: np.ndarray


@dataclass
class SceneSpec:
    camera: CameraSpec
    sun: SunSpec
    sky: SkySpec
    area_lights: list[AreaLightSpec]
    background: BackgroundSpec
    occluders: list[OccluderSpec]
    exposure_ev: float
    person_center: np.ndarray  # (3,) the point the camera aims near

    def to_json(self) -> dict[str, Any]:
        """Plain lists/floats/strings for the sample's json entry."""
        return jsonable(self)


def jsonable(obj: Any) -> Any:
    """JSON-able form of scene descriptions, floats rounded to JSON_DIGITS decimals."""
    return to_jsonable(obj, JSON_DIGITS)


# ----------------------------------------------------------------------------------------- backgrounds


class BackgroundsError(ValueError):
    """The backgrounds folder cannot be used."""


@functools.lru_cache(maxsize=8)
def list_backgrounds(folder: str) -> tuple[str, ...]:
    """Sorted image files of a backgrounds folder (sorted so sample i picks the same file everywhere)."""
    p = Path(folder)
    if not p.is_dir():
        raise BackgroundsError(f"backgrounds folder {folder!r}: not a readable directory")
    if not os.access(p, os.R_OK | os.X_OK):
        raise BackgroundsError(f"backgrounds folder {folder!r}: permission denied")
    files = tuple(str(f) for f in sorted(p.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
    if not files:
        raise BackgroundsError(
            f"backgrounds folder {folder!r}: holds no images (expected {', '.join(IMAGE_EXTENSIONS)})"
        )
    unreadable = [f for f in files if not os.access(f, os.R_OK)]
    if unreadable:
        raise BackgroundsError(f"backgrounds folder {folder!r}: cannot read {unreadable[0]!r}")
    return files


# ----------------------------------------------------------------------------------------- sampling


def _uniform(rng: np.random.Generator, r: Range) -> float:
    return float(rng.uniform(r[0], r[1]))


def _choice(rng: np.random.Generator, options: tuple) -> Any:
    return options[int(rng.integers(len(options)))]


def _jitter_color(rng: np.random.Generator, color: Color, amount: float) -> np.ndarray:
    c = np.asarray(color, dtype=np.float64) * (1.0 + amount * rng.uniform(-1.0, 1.0, 3))
    return np.clip(c, 0.0, 1.0)


def look_at_rotation(position: np.ndarray, target: np.ndarray, roll_deg: float) -> np.ndarray:
    """OpenCV world -> camera rotation of a camera at `position` looking at `target`, world up = +y."""
    forward = target - position
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, np.array([0.0, 1.0, 0.0]))
    if np.linalg.norm(right) < 1e-6:  # looking straight down: any right vector will do
        right = np.array([1.0, 0.0, 0.0])
    right = right / np.linalg.norm(right)
    down = np.cross(forward, right)
    R = np.stack([right, down, forward])
    a = np.deg2rad(roll_deg)
    roll = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    return roll @ R


def _min_max(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column min and max of (N, D) points (numpy reduces a transposed copy far faster)."""
    cols = np.ascontiguousarray(np.asarray(points).T)
    return cols.min(axis=1), cols.max(axis=1)


def _project_columns(points_t: np.ndarray, R: np.ndarray, t: np.ndarray, K: np.ndarray):
    """(3, N) world points -> (2, N) pixel coordinates and (N,) depths."""
    M, b = K @ R, K @ t
    x, y, z = points_t
    # Written out: a (3, 3) x (3, N) product through BLAS costs far more than these nine axpys.
    w = M[2, 0] * x + M[2, 1] * y + M[2, 2] * z + b[2]
    u = (M[0, 0] * x + M[0, 1] * y + M[0, 2] * z + b[0]) / w
    v = (M[1, 0] * x + M[1, 1] * y + M[1, 2] * z + b[1]) / w
    return np.stack([u, v]), R[2, 0] * x + R[2, 1] * y + R[2, 2] * z + t[2]


def _full_intrinsics(focal_mm: float, config: SceneConfig) -> np.ndarray:
    fw, fh = config.full_resolution
    f = focal_mm * fw / config.sensor_width_mm
    return np.array([[f, 0.0, fw / 2.0 - 0.5], [0.0, f, fh / 2.0 - 0.5], [0.0, 0.0, 1.0]])


def _crop_box(
    rng: np.random.Generator, uv: np.ndarray, config: SceneConfig, width: int, height: int
) -> np.ndarray:
    """Box (x0, y0, x1, y1, pixel edges) of the output aspect ratio around the projected person (2, N)."""
    lo, hi = uv.min(axis=1) - 0.5, uv.max(axis=1) + 0.5
    center = (lo + hi) / 2.0
    aspect = width / height
    box_h = max(hi[1] - lo[1], (hi[0] - lo[0]) / aspect)
    box_h = box_h / (1.0 - 2.0 * _uniform(rng, config.crop_margin))
    box_w = box_h * aspect
    center = center + rng.uniform(-1.0, 1.0, 2) * config.crop_shift * np.array([box_w, box_h])
    return np.array(
        [center[0] - box_w / 2, center[1] - box_h / 2, center[0] + box_w / 2, center[1] + box_h / 2]
    )


def _crop_intrinsics(full_K: np.ndarray, box: np.ndarray, width: int) -> np.ndarray:
    """Intrinsics of the image that resamples `box` of the full view to `width` pixels across."""
    s = width / (box[2] - box[0])
    K = np.array(full_K, dtype=np.float64)
    K[0, 0] *= s
    K[1, 1] *= s
    K[0, 2] = (full_K[0, 2] + 0.5 - box[0]) * s - 0.5
    K[1, 2] = (full_K[1, 2] + 0.5 - box[1]) * s - 0.5
    return K


def sample_camera(
    rng: np.random.Generator, config: SceneConfig, width: int, height: int, vertices: np.ndarray
) -> CameraSpec:
    """Camera around the person, aimed near its centre, with the crop box framing it."""
    points_t = np.ascontiguousarray(np.asarray(vertices, dtype=np.float64).T)
    lo, hi = points_t.min(axis=1), points_t.max(axis=1)
    center = (lo + hi) / 2.0
    distance = _uniform(rng, config.camera_distance)
    cam_height = _uniform(rng, config.camera_height)
    azimuth = _uniform(rng, config.camera_azimuth_deg)
    roll = _uniform(rng, config.camera_roll_deg)
    focal = _uniform(rng, config.focal_length_mm)
    target = center + rng.normal(0.0, config.aim_jitter, 3)
    a = np.deg2rad(azimuth)
    position = np.array([center[0] + distance * np.sin(a), cam_height, center[2] + distance * np.cos(a)])
    R = look_at_rotation(position, target, roll)
    t = -R @ position

    fw, fh = config.full_resolution
    full_K = _full_intrinsics(focal, config)
    uv, _ = _project_columns(points_t, R, t, full_K)
    box = _crop_box(rng, uv, config, width, height)
    # Shorten the lens until the crop fits inside the full view (the crop scales about the principal point).
    cx, cy = full_K[0, 2] + 0.5, full_K[1, 2] + 0.5
    need = max(
        (box[2] - cx) / (fw - cx), (cx - box[0]) / cx, (box[3] - cy) / (fh - cy), (cy - box[1]) / cy, 1.0
    )
    if need > 1.0:
        new_focal = max(focal / need, config.min_focal_length_mm)
        scale = new_focal / focal
        focal = new_focal
        full_K = _full_intrinsics(focal, config)
        box = np.array(
            [
                cx + (box[0] - cx) * scale,
                cy + (box[1] - cy) * scale,
                cx + (box[2] - cx) * scale,
                cy + (box[3] - cy) * scale,
            ]
        )
    K = _crop_intrinsics(full_K, box, width)
    return CameraSpec(
        K=K,
        R=R,
        t=t,
        width=width,
        height=height,
        full_K=full_K,
        full_width=fw,
        full_height=fh,
        crop_box=box,
        focal_length_mm=focal,
        sensor_width_mm=config.sensor_width_mm,
        position=position,
        distance=distance,
        height_above_ground=cam_height,
        azimuth_deg=azimuth,
        roll_deg=roll,
    )


def _direction(elevation_deg: float, azimuth_deg: float) -> np.ndarray:
    e, a = np.deg2rad(elevation_deg), np.deg2rad(azimuth_deg)
    return np.array([np.cos(e) * np.sin(a), np.sin(e), np.cos(e) * np.cos(a)])


def sample_lighting(
    rng: np.random.Generator, config: SceneConfig, center: np.ndarray
) -> tuple[SunSpec, SkySpec, list[AreaLightSpec]]:
    warm = _uniform(rng, config.sun_warmth)
    sun = SunSpec(
        direction=_direction(_uniform(rng, config.sun_elevation_deg), _uniform(rng, config.sun_azimuth_deg)),
        strength=_uniform(rng, config.sun_strength),
        angle_deg=_uniform(rng, config.sun_angle_deg),
        color=np.array([1.0, 1.0 - 0.35 * warm, 1.0 - 0.7 * warm]),
    )
    k = int(rng.integers(len(config.sky_zenith_colors)))
    sky = SkySpec(
        zenith_color=_jitter_color(rng, config.sky_zenith_colors[k], 0.1),
        horizon_color=_jitter_color(rng, config.sky_horizon_colors[k % len(config.sky_horizon_colors)], 0.1),
        strength=_uniform(rng, config.sky_strength),
    )
    lights: list[AreaLightSpec] = []
    if rng.random() < config.area_light_probability:
        n = int(rng.integers(config.area_light_count[0], config.area_light_count[1] + 1))
        for _ in range(n):
            d = _direction(_uniform(rng, (20.0, 70.0)), _uniform(rng, (0.0, 360.0)))
            lights.append(
                AreaLightSpec(
                    position=center + d * _uniform(rng, config.area_light_distance),
                    target=center.copy(),
                    strength=_uniform(rng, config.area_light_strength),
                    size=_uniform(rng, config.area_light_size),
                    color=_jitter_color(rng, (1.0, 0.9, 0.8), 0.15),
                )
            )
    return sun, sky, lights


def sample_surface(
    rng: np.random.Generator, config: SceneConfig, palette: tuple[Color, ...], patterns: tuple[str, ...]
) -> SurfaceSpec:
    color_a = _jitter_color(rng, _choice(rng, palette), config.color_jitter)
    contrast = _uniform(rng, config.pattern_contrast)
    other = _jitter_color(rng, _choice(rng, palette), config.color_jitter)
    return SurfaceSpec(
        pattern=str(_choice(rng, patterns)),
        color_a=color_a,
        color_b=np.clip((1.0 - contrast) * color_a + contrast * other, 0.0, 1.0),
        scale=_uniform(rng, config.pattern_scale),
        roughness=_uniform(rng, config.surface_roughness),
        rotation_deg=_uniform(rng, (0.0, 90.0)),
    )


def _backdrop_extent(camera: CameraSpec, center: np.ndarray, normal: np.ndarray) -> float:
    """Edge length of a square wall at `center` that covers the output image seen by the camera."""
    depth = float(np.dot(center - camera.position, -normal))
    half_w = max(camera.K[0, 2] + 0.5, camera.width - camera.K[0, 2]) / camera.K[0, 0]
    half_h = max(camera.K[1, 2] + 0.5, camera.height - camera.K[1, 2]) / camera.K[1, 1]
    return 4.0 * depth * max(half_w, half_h) + 2.0


def sample_background(
    rng: np.random.Generator, config: SceneConfig, camera: CameraSpec, center: np.ndarray
) -> BackgroundSpec:
    ground = sample_surface(rng, config, config.ground_palette, config.ground_patterns)
    use_image = config.backgrounds_dir is not None and rng.random() < config.background_image_probability
    if not use_image and rng.random() >= config.backdrop_probability:
        return BackgroundSpec(ground=ground, backdrop=None)
    view = center - camera.position
    if not use_image:
        view[1] = 0.0  # procedural walls stand upright; image planes face the camera
    view = view / np.linalg.norm(view)
    wall_center = center + view * _uniform(rng, config.backdrop_distance)
    normal = -view
    up = np.array([0.0, 1.0, 0.0]) - normal * normal[1]
    up = up / np.linalg.norm(up)
    size = _backdrop_extent(camera, wall_center, normal)
    if use_image:
        files = list_backgrounds(config.backgrounds_dir)
        backdrop = BackdropSpec(
            center=wall_center,
            normal=normal,
            up=up,
            width=size,
            height=size,
            surface=None,
            image=files[int(rng.integers(len(files)))],
        )
    else:
        backdrop = BackdropSpec(
            center=wall_center,
            normal=normal,
            up=up,
            width=size,
            height=size,
            surface=sample_surface(rng, config, config.backdrop_palette, config.backdrop_patterns),
            image=None,
        )
    return BackgroundSpec(ground=ground, backdrop=backdrop)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def sample_occluders(
    rng: np.random.Generator, config: SceneConfig, camera: CameraSpec, vertices: np.ndarray
) -> list[OccluderSpec]:
    """Objects between camera and person that partly cover the person's projection."""
    if rng.random() >= config.occluder_probability:
        return []
    n = int(rng.integers(config.occluder_count[0], config.occluder_count[1] + 1))
    n = min(n, OCCLUDER_POOL_SIZE)
    uv, z = _project_columns(
        np.ascontiguousarray(np.asarray(vertices, np.float64).T), camera.R, camera.t, camera.K
    )
    lo, hi = uv.min(axis=1), uv.max(axis=1)
    mid, half = (lo + hi) / 2.0, (hi - lo) / 2.0
    person_depth, nearest = float(np.median(z)), float(z.min())
    f = camera.K[0, 0]
    out = []
    for _ in range(n):
        angle = _uniform(rng, (0.0, 2.0 * np.pi))
        offset = _uniform(rng, config.occluder_offset)
        pix = mid + offset * half * np.array([np.cos(angle), np.sin(angle)])
        depth = max(person_depth * _uniform(rng, config.occluder_depth), 0.4)
        size_m = _uniform(rng, config.occluder_size) * (hi[1] - lo[1]) * depth / f
        aspect = rng.uniform(0.6, 1.4, 3)
        shape = str(_choice(rng, config.occluder_shapes))
        if shape == "sphere":
            aspect = np.ones(3)
        elif shape == "cylinder":
            aspect[1] = aspect[0]
        # Keep the whole object in front of the person's nearest point (it must not cut into the body).
        reach = 0.5 * size_m * float(np.linalg.norm(aspect))
        depth = max(min(depth, nearest - reach), 0.3)
        ray = np.linalg.solve(camera.K, np.array([pix[0], pix[1], 1.0]))
        center = camera.R.T @ (ray * depth - camera.t)
        out.append(
            OccluderSpec(
                shape=shape,
                center=center,
                size=size_m * aspect,
                rotation=_random_rotation(rng),
                color=_jitter_color(rng, _choice(rng, config.occluder_palette), config.color_jitter),
            )
        )
    return out


def sample_scene(
    rng: np.random.Generator, config: SceneConfig, settings: Any, posed_vertices: np.ndarray
) -> SceneSpec:
    """Camera, lights, background and occluders for a person whose visible geometry is `posed_vertices`.

    `settings` is the RenderSettings (output width/height). Draws from `rng` in a fixed order.
    """
    verts = np.asarray(posed_vertices, dtype=np.float64)
    lo, hi = _min_max(verts)
    center = (lo + hi) / 2.0
    camera = sample_camera(rng, config, int(settings.width), int(settings.height), verts)
    sun, sky, lights = sample_lighting(rng, config, center)
    background = sample_background(rng, config, camera, center)
    occluders = sample_occluders(rng, config, camera, verts)
    return SceneSpec(
        camera=camera,
        sun=sun,
        sky=sky,
        area_lights=lights,
        background=background,
        occluders=occluders,
        exposure_ev=_uniform(rng, config.exposure_ev),
        person_center=center,
    )


__all__ = [
    "SceneConfig",
    "SceneSpec",
    "CameraSpec",
    "SunSpec",
    "SkySpec",
    "AreaLightSpec",
    "SurfaceSpec",
    "BackdropSpec",
    "BackgroundSpec",
    "OccluderSpec",
    "sample_scene",
    "list_backgrounds",
    "BackgroundsError",
    "look_at_rotation",
    "jsonable",
    "OCCLUDER_POOL_SIZE",
]
