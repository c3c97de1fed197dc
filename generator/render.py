"""Render stage: the only module that imports bpy. One long-lived Blender scene per worker process.

`BlenderRenderer` builds a Cycles scene once (body mesh with one material per part, a shell object for
loose garments, camera, sun, area lights, gradient sky, ground, backdrop and a pool of occluders) and
`render(spec)` only updates it: vertex positions and colours, camera, lights, background and occluders.
Each frame is rendered once to an uncompressed multilayer EXR on /dev/shm (Combined, Position, Object
Index, Material Index), read back with Blender's bundled OpenImageIO and deleted.

Labels come from the Material Index pass (first sample only: exact integers, never blended). The
surface correspondence `vid` is the nearest posed body vertex to the Position pass point (also first
sample only), kept only when that vertex carries the pixel's part and lies close enough.

Blender's world is z-up; the body model's is y-up. Every object is placed with AXES (SMPL -> Blender),
so all specs stay in the body's frame and the Position pass is mapped back with AXES.T.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from typing import Any

import bpy
import numpy as np
from scipy.spatial import cKDTree

from generator.appearance import vertex_garment_labels
from generator.sample import RenderedSample, SampleSpec, cycles_seed
from generator.scene import OCCLUDER_POOL_SIZE, OCCLUDER_SHAPES, list_backgrounds
from protoreg.parts import BODY_PART_IDS, OCCLUDER

# SMPL world (y up) -> Blender world (z up): (x, y, z) -> (x, -z, y).
AXES = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
AXES4 = np.eye(4)
AXES4[:3, :3] = AXES

OBJECT_BODY, OBJECT_SHELL, OBJECT_OCCLUDER = 1, 2, 3  # Object Index pass values
AREA_LIGHT_POOL_SIZE = 3
VID_MAX_DISTANCE = 0.025  # m: a pixel's surface point must be this close to its vertex (on fine meshes)
IMAGE_CACHE_SIZE = 16  # background images kept loaded; older ones are freed so memory stays flat
VIEW_LAYER = "ViewLayer"


class RenderError(RuntimeError):
    """Blender did not produce the expected passes."""


def _import_oiio() -> Any:
    """Blender's bundled OpenImageIO (no extra wheel needed)."""
    site = os.path.join(bpy.utils.resource_path("LOCAL"), "python", "lib", "python3.11", "site-packages")
    if site not in sys.path:
        sys.path.append(site)
    import OpenImageIO as oiio

    # One thread per read: a thread pool's start-up costs more than decoding a small EXR (8 ms -> 2 ms).
    oiio.attribute("threads", 1)
    oiio.attribute("exr_threads", 1)
    return oiio


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def face_parts(faces: np.ndarray, vertex_parts: np.ndarray) -> np.ndarray:
    """Part of each triangle: the part two or three of its vertices share, else its first vertex's."""
    p = vertex_parts[faces]
    return np.where(p[:, 1] == p[:, 2], p[:, 1], p[:, 0]).astype(np.int64)


def border_mask(labels: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another label or another object (silhouettes, part borders, shell
    edges): their colour blends two surfaces, so their correspondence is marked unknown."""
    key = labels.astype(np.int64) * 256 + objects.astype(np.int64)
    p = np.pad(key, 1, mode="edge")
    return (
        (p[:-2, 1:-1] != key) | (p[2:, 1:-1] != key) | (p[1:-1, :-2] != key) | (p[1:-1, 2:] != key)
    )


def linear_to_srgb8(rgb: np.ndarray) -> np.ndarray:
    """Linear RGB floats -> sRGB uint8 (clipped), the standard view transform."""
    c = np.clip(rgb, 0.0, 1.0)
    s = np.where(c <= 0.0031308, 12.92 * c, 1.055 * np.power(c, 1.0 / 2.4) - 0.055)
    return np.round(s * 255.0).astype(np.uint8)


def _matrix(m: np.ndarray) -> Any:
    from mathutils import Matrix

    return Matrix([list(map(float, row)) for row in m])


def _pose4(rotation: np.ndarray, position: np.ndarray) -> np.ndarray:
    """4x4 object pose in Blender's world for a rotation/position given in the body's frame."""
    m = np.eye(4)
    m[:3, :3] = AXES @ rotation
    m[:3, 3] = AXES @ position
    return m


def _facing_rotation(z_axis: np.ndarray) -> np.ndarray:
    """Rotation whose local +z is `z_axis` (lights shine along their local -z)."""
    z = z_axis / np.linalg.norm(z_axis)
    helper = np.array([0.0, 1.0, 0.0]) if abs(z[1]) < 0.9 else np.array([1.0, 0.0, 0.0])
    x = np.cross(helper, z)
    x /= np.linalg.norm(x)
    return np.stack([x, np.cross(z, x), z], axis=1)


class _Nodes:
    """Small helper to build shader node graphs."""

    def __init__(self, tree: Any) -> None:
        self.tree = tree
        self.nodes = tree.nodes
        self.links = tree.links

    def new(self, kind: str, **props: Any) -> Any:
        node = self.nodes.new(kind)
        for k, v in props.items():
            setattr(node, k, v)
        return node

    def link(self, out: Any, inp: Any) -> None:
        self.links.new(out, inp)


class _Surface:
    """A procedural two-colour material (solid / noise / checker / brick), optionally with an image."""

    def __init__(self, name: str, with_image: bool) -> None:
        mat = bpy.data.materials.new(name)
        mat.use_nodes = True
        g = _Nodes(mat.node_tree)
        bsdf = g.nodes["Principled BSDF"]
        coords = g.new("ShaderNodeTexCoord")
        self.mapping = g.new("ShaderNodeMapping")
        g.link(coords.outputs["Object"], self.mapping.inputs["Vector"])
        vec = self.mapping.outputs["Vector"]
        noise = g.new("ShaderNodeTexNoise")
        noise.inputs["Scale"].default_value = 1.0
        noise.inputs["Detail"].default_value = 3.0
        g.link(vec, noise.inputs["Vector"])
        noise_fac = g.new("ShaderNodeMapRange")
        noise_fac.inputs["From Min"].default_value = 0.35
        noise_fac.inputs["From Max"].default_value = 0.65
        g.link(noise.outputs["Fac"], noise_fac.inputs["Value"])
        checker = g.new("ShaderNodeTexChecker")
        checker.inputs["Scale"].default_value = 1.0
        g.link(vec, checker.inputs["Vector"])
        brick = g.new("ShaderNodeTexBrick")
        brick.inputs["Scale"].default_value = 1.0
        brick.inputs["Color1"].default_value = (0.0, 0.0, 0.0, 1.0)
        brick.inputs["Color2"].default_value = (0.0, 0.0, 0.0, 1.0)
        brick.inputs["Mortar"].default_value = (1.0, 1.0, 1.0, 1.0)
        g.link(vec, brick.inputs["Vector"])
        # pattern = w_noise * noise + w_checker * checker + w_brick * brick (weights set per sample)
        self.weights = {}
        total = None
        for name_, out in (
            ("noise", noise_fac.outputs["Result"]),
            ("checker", checker.outputs["Fac"]),
            ("brick", brick.outputs["Fac"]),
        ):
            mul = g.new("ShaderNodeMath", operation="MULTIPLY")
            g.link(out, mul.inputs[0])
            self.weights[name_] = mul.inputs[1]
            if total is None:
                total = mul.outputs[0]
            else:
                add = g.new("ShaderNodeMath", operation="ADD", use_clamp=True)
                g.link(total, add.inputs[0])
                g.link(mul.outputs[0], add.inputs[1])
                total = add.outputs[0]
        self.mix = g.new("ShaderNodeMix", data_type="RGBA")
        g.link(total, self.mix.inputs["Factor"])
        color = self.mix.outputs["Result"]
        self.image_node = None
        if with_image:
            self.image_node = g.new("ShaderNodeTexImage", extension="EXTEND")
            g.link(coords.outputs["UV"], self.image_node.inputs["Vector"])
            self.image_mix = g.new("ShaderNodeMix", data_type="RGBA")
            g.link(color, self.image_mix.inputs["A"])
            g.link(self.image_node.outputs["Color"], self.image_mix.inputs["B"])
            color = self.image_mix.outputs["Result"]
        g.link(color, bsdf.inputs["Base Color"])
        self.bsdf = bsdf
        self.material = mat

    def set_surface(self, s: Any) -> None:
        for name_, socket in self.weights.items():
            socket.default_value = 1.0 if s.pattern == name_ else 0.0
        self.mix.inputs["A"].default_value = (*map(float, s.color_a), 1.0)
        self.mix.inputs["B"].default_value = (*map(float, s.color_b), 1.0)
        self.mapping.inputs["Scale"].default_value = (1.0 / s.scale,) * 3
        self.mapping.inputs["Rotation"].default_value = (0.0, 0.0, float(np.deg2rad(s.rotation_deg)))
        self.bsdf.inputs["Roughness"].default_value = float(s.roughness)
        if self.image_node is not None:
            self.image_mix.inputs["Factor"].default_value = 0.0

    def set_image(self, image: Any) -> None:
        self.image_node.image = image
        self.image_mix.inputs["Factor"].default_value = 1.0
        self.bsdf.inputs["Roughness"].default_value = 1.0


class BlenderRenderer:
    """Renders SampleSpecs with Cycles; build once per process, call render() per sample."""

    def __init__(
        self,
        settings: Any,
        body: Any,
        backgrounds_dir: str | os.PathLike | None = None,
        tmp_dir: str | None = None,
        mark_borders: bool = True,
    ) -> None:
        """`mark_borders`: give border pixels (see `border_mask`) vid 0, as the dataset format says."""
        if backgrounds_dir is not None:
            list_backgrounds(str(backgrounds_dir))  # fails early with a clear message
        self.settings = settings
        self.body = body
        self.mark_borders = bool(mark_borders)
        self.faces = np.asarray(body.faces, dtype=np.int64)
        self.vertex_parts = np.asarray(body.vertex_parts, dtype=np.uint8)
        self.num_vertices = int(self.vertex_parts.shape[0])
        if self.num_vertices >= 2**16 - 1:
            raise ValueError(f"body: {self.num_vertices} vertices; vid.png's 16 bits hold at most 65534")
        self.vid_max_distance = max(VID_MAX_DISTANCE, self._coarse_mesh_threshold())
        base = tmp_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else "/tmp")
        self.exr_path = os.path.join(base, f"protoreg-render-{os.getpid()}-{id(self):x}.exr")
        self._images: dict[str, Any] = {}
        atexit.register(_remove_quietly, self.exr_path)  # also when a caller renders without render()
        self.oiio = _import_oiio()
        self._build_scene()

    # ------------------------------------------------------------------ build

    def _coarse_mesh_threshold(self) -> float:
        """On coarse meshes a surface point can lie farther than VID_MAX_DISTANCE from every vertex:
        allow up to most of a typical edge length."""
        template = _np(self.body.rest_vertices(np.zeros((1, 1), dtype=np.float32)))[0]
        edges = np.concatenate([self.faces[:, [0, 1]], self.faces[:, [1, 2]], self.faces[:, [2, 0]]])
        lengths = np.linalg.norm(template[edges[:, 0]] - template[edges[:, 1]], axis=1)
        return float(0.75 * np.percentile(lengths, 95))

    def _build_scene(self) -> None:
        bpy.ops.wm.read_factory_settings(use_empty=True)
        self.scene = bpy.context.scene
        self._configure_cycles()
        self.part_materials = self._build_part_materials()
        self.body_obj = self._build_body()
        self.shell_obj = self._new_object("shell", bpy.data.meshes.new("shell"))
        self.shell_obj.pass_index = OBJECT_SHELL
        self.shell_obj.matrix_world = _matrix(AXES4)
        self.camera = self._build_camera()
        self.sun = self._new_object("sun", bpy.data.lights.new("sun", "SUN"))
        self.area_lights = []
        for i in range(AREA_LIGHT_POOL_SIZE):
            light = bpy.data.lights.new(f"area{i}", "AREA")
            light.shape = "SQUARE"
            self.area_lights.append(self._new_object(f"area{i}", light))
        self._build_world()
        self.ground, self.ground_surface = self._build_ground()
        self.backdrop, self.backdrop_surface = self._build_backdrop()
        self.occluders = self._build_occluders()

    def _configure_cycles(self) -> None:
        s, sc = self.settings, self.scene
        sc.render.engine = "CYCLES"
        cy = sc.cycles
        cy.device = self._select_device(str(getattr(s, "device", "CPU")))
        cy.samples = int(s.samples)
        cy.use_adaptive_sampling = False
        cy.use_denoising = bool(getattr(s, "denoise", False))
        if cy.use_denoising:
            cy.denoiser = "OPENIMAGEDENOISE"
            cy.denoising_prefilter = "FAST"
            cy.denoising_input_passes = "RGB"
        cy.pixel_filter_type = "BLACKMAN_HARRIS"
        cy.filter_width = float(getattr(s, "filter_width", 1.5))
        cy.max_bounces = 3  # one diffuse bounce lights the person from the ground; more costs without showing
        cy.diffuse_bounces = 1
        cy.glossy_bounces = 1
        cy.transmission_bounces = 0
        cy.volume_bounces = 0
        cy.transparent_max_bounces = 2
        cy.caustics_reflective = False
        cy.caustics_refractive = False
        cy.sample_clamp_indirect = 5.0
        cy.use_light_tree = False  # a sun and at most 3 area lights: the tree costs ~10 % and gains nothing
        cy.use_animated_seed = False
        sc.render.threads_mode = "FIXED"
        sc.render.threads = max(1, int(getattr(s, "threads_per_worker", 1)))
        sc.render.resolution_x = int(s.width)
        sc.render.resolution_y = int(s.height)
        sc.render.resolution_percentage = 100
        sc.render.film_transparent = False
        # Background photos never need more than 1024 pixels across in a person crop: cap their memory.
        sc.render.use_simplify = True
        cy.texture_limit_render = "1024"
        sc.render.use_file_extension = False
        sc.render.filepath = self.exr_path
        ims = sc.render.image_settings
        ims.media_type = "MULTI_LAYER_IMAGE"  # must come before file_format in 5.0
        ims.file_format = "OPEN_EXR_MULTILAYER"
        ims.exr_codec = "NONE"
        ims.color_depth = "32"
        vl = sc.view_layers[0]
        vl.name = VIEW_LAYER
        vl.use_pass_combined = True
        vl.use_pass_z = False
        vl.use_pass_position = True
        vl.use_pass_material_index = True
        vl.use_pass_object_index = True
        sc.view_settings.view_transform = "Standard"

    def _select_device(self, device: str) -> str:
        """'CPU', or 'GPU' / a backend name (CUDA, OPTIX, HIP, METAL, ONEAPI) when such a device exists."""
        if device.upper() == "CPU":
            return "CPU"
        try:
            prefs = bpy.context.preferences.addons["cycles"].preferences
            backends = (
                [device.upper()] if device.upper() != "GPU" else ["OPTIX", "CUDA", "HIP", "METAL", "ONEAPI"]
            )
            for backend in backends:
                try:
                    prefs.compute_device_type = backend
                except TypeError:
                    continue
                prefs.get_devices()
                gpus = [d for d in prefs.devices if d.type == backend]
                if gpus:
                    for d in prefs.devices:
                        d.use = d.type == backend
                    return "GPU"
        except Exception as e:  # noqa: BLE001 - any failure means: no usable GPU
            print(f"render: no GPU device usable ({e}); rendering on the CPU", file=sys.stderr)
        print(f"render: device {device} not present; rendering on the CPU", file=sys.stderr)
        return "CPU"

    def _new_object(self, name: str, data: Any) -> Any:
        obj = bpy.data.objects.new(name, data)
        self.scene.collection.objects.link(obj)
        return obj

    def _build_part_materials(self) -> list[Any]:
        """One material per body part (pass_index = part id) reading the per-vertex colour."""
        mats = []
        for part in BODY_PART_IDS:
            mat = bpy.data.materials.new(f"part{part:02d}")
            mat.pass_index = part
            mat.use_nodes = True
            g = _Nodes(mat.node_tree)
            bsdf = g.nodes["Principled BSDF"]
            col = g.new("ShaderNodeAttribute", attribute_name="col")
            rough = g.new("ShaderNodeAttribute", attribute_name="rough")
            g.link(col.outputs["Color"], bsdf.inputs["Base Color"])
            g.link(rough.outputs["Fac"], bsdf.inputs["Roughness"])
            bsdf.inputs["Specular IOR Level"].default_value = 0.3
            mats.append(mat)
        return mats

    def _fill_mesh(self, mesh: Any, vertices: np.ndarray, faces: np.ndarray, parts: np.ndarray) -> None:
        """Vertices, triangles, per-face part materials and smooth shading, all with foreach_set."""
        n, f = len(vertices), len(faces)
        mesh.vertices.add(n)
        mesh.vertices.foreach_set("co", np.ascontiguousarray(vertices, dtype=np.float32).ravel())
        mesh.loops.add(3 * f)
        mesh.polygons.add(f)
        mesh.polygons.foreach_set("loop_start", np.arange(0, 3 * f, 3, dtype=np.int32))
        mesh.polygons.foreach_set("vertices", np.ascontiguousarray(faces, dtype=np.int32).ravel())
        for mat in self.part_materials:
            mesh.materials.append(mat)
        mesh.polygons.foreach_set("material_index", (np.asarray(parts) - 1).astype(np.int32))
        mesh.polygons.foreach_set("use_smooth", np.ones(f, dtype=bool))
        mesh.update(calc_edges=True)
        mesh.color_attributes.new("col", "FLOAT_COLOR", "POINT")
        mesh.attributes.new("rough", "FLOAT", "POINT")

    def _build_body(self) -> Any:
        template = _np(self.body.rest_vertices(np.zeros((1, 1), dtype=np.float32)))[0]
        mesh = bpy.data.meshes.new("body")
        self._fill_mesh(mesh, template, self.faces, face_parts(self.faces, self.vertex_parts))
        obj = self._new_object("body", mesh)
        obj.pass_index = OBJECT_BODY
        obj.matrix_world = _matrix(AXES4)
        return obj

    def _build_camera(self) -> Any:
        cam = bpy.data.cameras.new("camera")
        cam.sensor_fit = "HORIZONTAL"
        cam.clip_start = 0.05
        cam.clip_end = 1000.0
        obj = self._new_object("camera", cam)
        self.scene.camera = obj
        return obj

    def _build_world(self) -> None:
        """A gradient sky (horizon -> zenith colour); cheap and headless-safe, lit directly by the sun."""
        world = bpy.data.worlds.new("sky")
        self.scene.world = world
        world.cycles.sampling_method = "NONE"  # no importance map rebuild per frame; the sun lights directly
        g = _Nodes(world.node_tree)
        bg = g.nodes["Background"]
        coords = g.new("ShaderNodeTexCoord")
        sep = g.new("ShaderNodeSeparateXYZ")
        g.link(coords.outputs["Generated"], sep.inputs["Vector"])
        up = g.new("ShaderNodeMath", operation="MAXIMUM")
        g.link(sep.outputs["Z"], up.inputs[0])
        up.inputs[1].default_value = 0.0
        curve = g.new("ShaderNodeMath", operation="POWER")
        g.link(up.outputs[0], curve.inputs[0])
        curve.inputs[1].default_value = 0.5
        self.sky_mix = g.new("ShaderNodeMix", data_type="RGBA")
        g.link(curve.outputs[0], self.sky_mix.inputs["Factor"])
        g.link(self.sky_mix.outputs["Result"], bg.inputs["Color"])
        self.sky_background = bg

    def _build_ground(self) -> tuple[Any, _Surface]:
        size = 400.0
        mesh = bpy.data.meshes.new("ground")
        mesh.from_pydata(
            [(-size, -size, 0.0), (size, -size, 0.0), (size, size, 0.0), (-size, size, 0.0)],
            [],
            [(0, 1, 2, 3)],
        )
        surface = _Surface("ground", with_image=False)
        mesh.materials.append(surface.material)
        return self._new_object("ground", mesh), surface

    def _build_backdrop(self) -> tuple[Any, _Surface]:
        mesh = bpy.data.meshes.new("backdrop")
        mesh.from_pydata(
            [(-1.0, -1.0, 0.0), (1.0, -1.0, 0.0), (1.0, 1.0, 0.0), (-1.0, 1.0, 0.0)], [], [(0, 1, 2, 3)]
        )
        uv = mesh.uv_layers.new(name="UVMap")
        uv.data.foreach_set("uv", np.array([0, 0, 1, 0, 1, 1, 0, 1], dtype=np.float32))
        surface = _Surface("backdrop", with_image=True)
        mesh.materials.append(surface.material)
        return self._new_object("backdrop", mesh), surface

    def _build_occluders(self) -> list[dict[str, Any]]:
        """OCCLUDER_POOL_SIZE slots, each with a unit box, cylinder and sphere sharing one material."""
        slots = []
        for i in range(OCCLUDER_POOL_SIZE):
            mat = bpy.data.materials.new(f"occluder{i}")
            mat.pass_index = OCCLUDER
            mat.use_nodes = True
            bsdf = mat.node_tree.nodes["Principled BSDF"]
            bsdf.inputs["Roughness"].default_value = 0.7
            bsdf.inputs["Specular IOR Level"].default_value = 0.3
            objs = {}
            for shape in OCCLUDER_SHAPES:
                mesh = self._unit_shape_mesh(shape, f"occ{i}_{shape}")
                mesh.materials.append(mat)
                obj = self._new_object(f"occ{i}_{shape}", mesh)
                obj.pass_index = OBJECT_OCCLUDER
                obj.hide_render = True
                objs[shape] = obj
            slots.append({"bsdf": bsdf, "objects": objs})
        return slots

    @staticmethod
    def _unit_shape_mesh(shape: str, name: str) -> Any:
        """A unit-extent (1 m across each axis) box, y-axis cylinder or sphere, in the body's frame."""
        import bmesh

        bm = bmesh.new()
        if shape == "box":
            bmesh.ops.create_cube(bm, size=1.0)
        elif shape == "cylinder":
            bmesh.ops.create_cone(bm, cap_ends=True, segments=24, radius1=0.5, radius2=0.5, depth=1.0)
            bmesh.ops.rotate(bm, verts=bm.verts, cent=(0, 0, 0), matrix=_matrix(AXES.T))  # axis z -> y
        else:
            bmesh.ops.create_uvsphere(bm, u_segments=24, v_segments=12, radius=0.5)
        for f in bm.faces:
            f.smooth = shape != "box"
        mesh = bpy.data.meshes.new(name)
        bm.to_mesh(mesh)
        bm.free()
        return mesh

    # ------------------------------------------------------------------ per-sample updates

    def _set_body(self, spec: SampleSpec) -> None:
        mesh = self.body_obj.data
        verts = np.ascontiguousarray(spec.posed_vertices, dtype=np.float32)
        if verts.shape != (self.num_vertices, 3):
            raise ValueError(f"posed_vertices: expected ({self.num_vertices}, 3), got {verts.shape}")
        mesh.vertices.foreach_set("co", verts.ravel())
        colors, rough = self._vertex_appearance(spec.dressed, self.num_vertices)
        mesh.color_attributes["col"].data.foreach_set("color", colors.ravel())
        mesh.attributes["rough"].data.foreach_set("value", rough)
        mesh.update()

    @staticmethod
    def _vertex_appearance(dressed: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
        rgba = np.ones((n, 4), dtype=np.float32)
        rgba[:, :3] = np.asarray(dressed.vertex_colors, dtype=np.float32).reshape(n, 3)
        rough = getattr(dressed, "roughness", None)
        rough = np.full(n, 0.6, dtype=np.float32) if rough is None else np.asarray(rough, dtype=np.float32)
        return rgba, rough

    def _set_shells(self, spec: SampleSpec) -> tuple[np.ndarray, np.ndarray]:
        """Rebuild the shell mesh (new datablock, old one freed); returns its vertices and source vertex."""
        shells = [s for s in (getattr(spec.dressed, "shells", None) or []) if len(s.faces)]
        old = self.shell_obj.data
        mesh = bpy.data.meshes.new("shell")
        if shells:
            offsets = np.cumsum([0] + [len(s.vertices) for s in shells[:-1]])
            verts = np.concatenate([np.asarray(s.vertices, dtype=np.float32) for s in shells])
            faces = np.concatenate(
                [np.asarray(s.faces, dtype=np.int64) + o for s, o in zip(shells, offsets, strict=True)]
            )
            source = np.concatenate([np.asarray(s.source_vertex, dtype=np.int64) for s in shells])
            colors = np.concatenate([np.asarray(s.vertex_colors, dtype=np.float32) for s in shells])
            self._fill_mesh(mesh, verts, faces, face_parts(faces, self.vertex_parts[source]))
            rgba = np.ones((len(verts), 4), dtype=np.float32)
            rgba[:, :3] = colors
            mesh.color_attributes["col"].data.foreach_set("color", rgba.ravel())
            rough = [getattr(s, "roughness", None) for s in shells]
            rough_v = np.concatenate(
                [
                    np.full(len(s.vertices), 0.8, np.float32) if r is None else np.asarray(r, np.float32)
                    for s, r in zip(shells, rough, strict=True)
                ]
            )
            mesh.attributes["rough"].data.foreach_set("value", rough_v)
        else:
            verts, source = np.zeros((0, 3), np.float32), np.zeros(0, np.int64)
        self.shell_obj.data = mesh
        bpy.data.meshes.remove(old)
        self.shell_obj.hide_render = not shells
        return verts, source

    def _set_camera(self, spec: SampleSpec) -> None:
        cam = spec.scene.camera
        if (cam.width, cam.height) != (self.scene.render.resolution_x, self.scene.render.resolution_y):
            raise ValueError(
                f"camera: spec is {cam.width}x{cam.height}, renderer is "
                f"{self.scene.render.resolution_x}x{self.scene.render.resolution_y}"
            )
        lens = cam.blender_lens()
        data = self.camera.data
        data.sensor_fit = "HORIZONTAL"
        data.sensor_width = lens["sensor_width"]
        data.lens = lens["lens"]
        data.shift_x = lens["shift_x"]
        data.shift_y = lens["shift_y"]
        self.camera.matrix_world = _matrix(AXES4 @ cam.cam_to_world())

    def _set_lights(self, spec: SampleSpec) -> None:
        sun = spec.scene.sun
        self.sun.matrix_world = _matrix(_pose4(_facing_rotation(np.asarray(sun.direction)), np.zeros(3)))
        self.sun.data.energy = float(sun.strength)
        self.sun.data.angle = float(np.deg2rad(sun.angle_deg))
        self.sun.data.color = tuple(map(float, sun.color))
        sky = spec.scene.sky
        self.sky_mix.inputs["A"].default_value = (*map(float, sky.horizon_color), 1.0)
        self.sky_mix.inputs["B"].default_value = (*map(float, sky.zenith_color), 1.0)
        self.sky_background.inputs["Strength"].default_value = float(sky.strength)
        for i, obj in enumerate(self.area_lights):
            if i < len(spec.scene.area_lights):
                light = spec.scene.area_lights[i]
                pos = np.asarray(light.position)
                obj.matrix_world = _matrix(_pose4(_facing_rotation(pos - np.asarray(light.target)), pos))
                obj.data.energy = float(light.strength)
                obj.data.size = float(light.size)
                obj.data.color = tuple(map(float, light.color))
                obj.hide_render = False
            else:
                obj.hide_render = True

    def _background_image(self, path: str) -> Any:
        image = self._images.get(path)
        if image is None:
            try:
                image = bpy.data.images.load(path, check_existing=False)
            except RuntimeError as e:
                raise RenderError(f"background image {path}: cannot be read ({e})") from None
            if image.size[0] == 0 or image.size[1] == 0:  # asking for the size loads the pixels
                bpy.data.images.remove(image)
                raise RenderError(f"background image {path}: cannot be decoded (expected an image file)")
            self._images[path] = image
            while len(self._images) > IMAGE_CACHE_SIZE:
                oldest = next(iter(self._images))
                bpy.data.images.remove(self._images.pop(oldest))
        return image

    def _set_background(self, spec: SampleSpec) -> None:
        bg = spec.scene.background
        self.ground_surface.set_surface(bg.ground)
        self.ground.matrix_world = _matrix(np.eye(4))  # its mesh is already in Blender's z-up frame
        backdrop = bg.backdrop
        if backdrop is None:
            self.backdrop.hide_render = True
            return
        self.backdrop.hide_render = False
        normal, up = np.asarray(backdrop.normal), np.asarray(backdrop.up)
        right = np.cross(up, normal)
        width, height = float(backdrop.width), float(backdrop.height)
        if backdrop.image is not None:
            image = self._background_image(backdrop.image)
            self.backdrop_surface.set_image(image)
            w, h = image.size
            aspect = w / max(h, 1)
            width, height = width * max(1.0, aspect), height * max(1.0, 1.0 / aspect)
        else:
            self.backdrop_surface.set_surface(backdrop.surface)
        rot = np.stack([right, up, normal], axis=1)
        pose = _pose4(rot, np.asarray(backdrop.center))
        pose[:3, :3] = pose[:3, :3] @ np.diag([width / 2.0, height / 2.0, 1.0])
        self.backdrop.matrix_world = _matrix(pose)

    def _set_occluders(self, spec: SampleSpec) -> None:
        occs = spec.scene.occluders
        for i, slot in enumerate(self.occluders):
            occ = occs[i] if i < len(occs) else None
            for shape, obj in slot["objects"].items():
                visible = occ is not None and occ.shape == shape
                obj.hide_render = not visible
                if visible:
                    pose = _pose4(
                        np.asarray(occ.rotation) @ np.diag(np.asarray(occ.size)), np.asarray(occ.center)
                    )
                    obj.matrix_world = _matrix(pose)
            if occ is not None:
                slot["bsdf"].inputs["Base Color"].default_value = (*map(float, occ.color), 1.0)

    # ------------------------------------------------------------------ render + read back

    def _read_exr(self) -> dict[str, np.ndarray]:
        """Every pass of the multi-part EXR as (H, W, C) float32, keyed by pass name."""
        inp = self.oiio.ImageInput.open(self.exr_path)
        if inp is None:
            raise RenderError(f"render: Blender wrote no readable EXR at {self.exr_path}")
        passes: dict[str, np.ndarray] = {}
        try:
            sub = 0
            while inp.seek_subimage(sub, 0):
                spec = inp.spec()
                # One pass per part; channels are named "<layer>.<pass>.<channel>".
                name = spec.channelnames[0].split(".")
                key = name[-2] if len(name) >= 2 else name[0]
                passes[key] = inp.read_image(sub, 0, 0, spec.nchannels, self.oiio.FLOAT)
                sub += 1
        finally:
            inp.close()
        return passes

    def _surfaces(
        self, spec: SampleSpec, shell_verts: np.ndarray, shell_source: np.ndarray
    ) -> list[tuple[int, cKDTree, np.ndarray]]:
        """(Object Index, kd-tree of its vertices, the body vertex of each) for the body and, when there are
        any, the loose-garment shells: built once per frame for `vid` and garments.png."""

        def tree(points: np.ndarray) -> cKDTree:
            return cKDTree(np.asarray(points, np.float64), balanced_tree=False, compact_nodes=False)

        out = [(OBJECT_BODY, tree(spec.posed_vertices), np.arange(self.num_vertices))]
        if len(shell_verts):
            out.append((OBJECT_SHELL, tree(shell_verts), np.asarray(shell_source)))
        return out

    def _correspondence(
        self, parts: np.ndarray, objects: np.ndarray, world: np.ndarray, surfaces: list
    ) -> np.ndarray:
        """vid: nearest posed body vertex (+1) to each body-part pixel's surface point; 0 when unsure
        (border pixels, a nearest vertex of another part or too far away)."""
        vid = np.zeros(parts.shape, dtype=np.uint16)
        body_px = (parts >= 1) & (parts <= 14)
        if self.mark_borders:
            body_px &= ~border_mask(parts, objects)
        for obj, tree, to_body in surfaces:
            mask = body_px & (objects == obj)
            if mask.any():
                dist, idx = tree.query(world[mask], distance_upper_bound=self.vid_max_distance)
                self._keep(vid, mask, parts, dist, idx, to_body)
        return vid

    def _garment_map(
        self, spec: SampleSpec, parts: np.ndarray, objects: np.ndarray, world: np.ndarray, surfaces: list
    ) -> np.ndarray:
        """garments.png: the label (skin, hair, top, bottom, shoes) of the body vertex nearest each person
        pixel's surface point among those of the pixel's own part (of its 4 nearest; the nearest when none
        is), on every person pixel (borders too: a recolouring must reach the outline), 0 elsewhere. A
        shell pixel takes its shell vertex's source vertex."""
        labels = vertex_garment_labels(spec.dressed, self.num_vertices)
        out = np.zeros(parts.shape, dtype=np.uint8)
        person = (parts >= 1) & (parts <= 14)
        for obj, tree, to_body in surfaces:
            mask = person & (objects == obj)
            if not mask.any():
                continue
            _, idx = tree.query(world[mask], k=min(4, len(to_body)))
            body_idx = to_body[idx.reshape(len(idx), -1)]
            same_part = self.vertex_parts[body_idx] == parts[mask][:, None]
            first = np.where(same_part.any(axis=1), same_part.argmax(axis=1), 0)
            out[mask] = labels[body_idx[np.arange(len(body_idx)), first]]
        return out

    def _keep(
        self,
        vid: np.ndarray,
        mask: np.ndarray,
        parts: np.ndarray,
        dist: np.ndarray,
        idx: np.ndarray,
        to_body: np.ndarray,
    ) -> None:
        found = np.isfinite(dist)
        body_idx = np.zeros(len(idx), dtype=np.int64)
        body_idx[found] = to_body[idx[found]]
        ok = found & (self.vertex_parts[body_idx] == parts[mask])
        values = np.where(ok, body_idx + 1, 0).astype(np.uint16)
        vid[mask] = values

    @staticmethod
    def _body_frame(position: np.ndarray) -> np.ndarray:
        """Position pass (Blender's z-up world) -> (H, W, 3) float64 points in the body's y-up frame."""
        x, y, z = (position[..., k].astype(np.float64) for k in range(3))
        return np.stack([x, z, -y], axis=-1)  # inverse of AXES: (x, y, z) -> (x, -z, y)

    def render(self, spec: SampleSpec) -> RenderedSample:
        """Render one sample: update the scene, render once, read the passes, derive labels and vid."""
        t0 = time.perf_counter()
        self._set_body(spec)
        shell_verts, shell_source = self._set_shells(spec)
        self._set_camera(spec)
        self._set_lights(spec)
        self._set_background(spec)
        self._set_occluders(spec)
        self.scene.cycles.seed = cycles_seed(spec.seed)
        t1 = time.perf_counter()
        try:
            bpy.ops.render.render(write_still=True)
            t2 = time.perf_counter()
            passes = self._read_exr()
        finally:
            if os.path.exists(self.exr_path):
                os.remove(self.exr_path)
        t3 = time.perf_counter()
        missing = [p for p in ("Combined", "Position", "Material Index", "Object Index") if p not in passes]
        if missing:
            raise RenderError(f"render: EXR lacks passes {missing} (has {sorted(passes)})")
        linear = passes["Combined"][..., :3] * np.float32(2.0**spec.scene.exposure_ev)
        rgb = linear_to_srgb8(linear)
        parts = np.rint(passes["Material Index"][..., 0]).astype(np.int64)
        parts = np.clip(parts, 0, OCCLUDER).astype(np.uint8)
        objects = np.rint(passes["Object Index"][..., 0]).astype(np.int64)
        world = self._body_frame(passes["Position"])
        surfaces = self._surfaces(spec, shell_verts, shell_source)
        vid = self._correspondence(parts, objects, world, surfaces)
        depth = None
        if getattr(self.settings, "write_depth", False):
            cam = spec.scene.camera
            z = (
                world[..., 0] * cam.R[2, 0]
                + world[..., 1] * cam.R[2, 1]
                + world[..., 2] * cam.R[2, 2]
                + cam.t[2]
            )
            hit = np.any(passes["Position"][..., :3] != 0.0, axis=-1)  # the sky has no position
            depth = np.where(hit, z, 0.0).astype(np.float32)
        garments = None
        if getattr(self.settings, "write_garments", False):
            garments = self._garment_map(spec, parts, objects, world, surfaces)
        t4 = time.perf_counter()
        timings = {"update": t1 - t0, "render": t2 - t1, "read": t3 - t2, "post": t4 - t3}
        return RenderedSample(rgb=rgb, parts=parts, vid=vid, depth=depth, garments=garments, timings=timings)

    def close(self) -> None:
        """Free the scene's data and the temporary file (the process may keep running)."""
        if os.path.exists(self.exr_path):
            os.remove(self.exr_path)
        for image in self._images.values():
            bpy.data.images.remove(image)
        self._images.clear()


__all__ = ["BlenderRenderer", "RenderedSample", "RenderError", "linear_to_srgb8", "face_parts", "border_mask"]
