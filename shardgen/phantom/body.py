"""The body and the organs around the liver: habitus, body wall, thorax, bone, vessels,
spleen, kidneys, stomach, pancreas and bowel."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .tissues import TISSUE_CODES, _ONTO_FAT, _codes
from .geometry import _Canvas, _Field, _Grid, _ellipsoid, _tube
from .scan import _Scan


_RIGHT_LOBE_Z = (25.0, 115.0)  # centre and semi-axis (mm, times the liver size factor): the lowest lobe


@dataclass(frozen=True)
class _Frame:
    """Case landmarks (mm, patient frame) that the organs are placed by."""

    a: float  # body: lateral semi-axis of the skin
    b_ant: float  # anterior semi-axis
    b_post: float  # posterior semi-axis
    p_ant: float  # superellipse exponents (front rounder, back flatter)
    p_post: float
    fat: float  # subcutaneous fat, front and sides
    fat_post: float  # subcutaneous fat over the back
    wall: float  # abdominal wall muscle
    wall_post: float  # posterior wall muscle (paraspinal muscles are painted separately)
    outline: _Field  # low-frequency irregularity of the body outline (evaluated in-plane)
    wobble: tuple[float, float, float]  # girth change along z: amplitude, period mm, phase
    y_vb: float  # vertebral body centre
    vb: tuple[float, float]  # vertebral body semi-axes (y, x)
    s: float  # organ size factor
    sl: float  # liver size factor
    dome: float  # z of the right hemidiaphragm apex

    @property
    def liver_z(self) -> tuple[float, float]:
        """Bounds of the liver's height (mm): the bottom of the right lobe (the lowest lobe)
        and the apex of the right dome, which clips the liver's top."""
        centre, semi = _RIGHT_LOBE_Z
        return (centre - semi) * self.sl, self.dome

    @property
    def a_c(self) -> float:
        return self.a - self.fat - self.wall

    @property
    def y_ant(self) -> float:
        return -(self.b_ant - self.fat - self.wall)

    def layers(self) -> list[tuple[float, float, float]]:
        """Semi-axes (a, b_ant, b_post) of skin, skin's inner face, fat's inner face, cavity."""
        return [(self.a, self.b_ant, self.b_post),
                (self.a - 2, self.b_ant - 2, self.b_post - 2),
                (self.a - self.fat, self.b_ant - self.fat, self.b_post - self.fat_post),
                (self.a_c, -self.y_ant, self.b_post - self.fat_post - self.wall_post)]

    def girth(self, z: np.ndarray) -> np.ndarray:
        amp, period, phase = self.wobble
        return (1.0 + amp * np.sin(2 * np.pi * z / period + phase)).astype(np.float32)

    def dome_height(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """z of the diaphragm's abdominal surface: two domes, deeper posterior recesses."""
        yc, depth = (self.y_ant + self.y_vb) / 2, self.y_vb - self.y_ant
        fy = 40.0 * ((y - yc) / depth) ** 2
        right = self.dome - 110.0 * ((x + 0.45 * self.a_c) / self.a_c) ** 2 - fy
        left = self.dome - 15.0 - 110.0 * ((x - 0.45 * self.a_c) / self.a_c) ** 2 - fy
        recess = 15.0 * np.clip((y - self.y_vb + 20.0) / 60.0, 0.0, 1.0)
        return (np.maximum(right, left) - recess).astype(np.float32)


def _sample_frame(rng: np.random.Generator, scan: _Scan) -> _Frame:
    """Body size and habitus, spine position, organ and liver size factors, dome height."""
    # keep the body inside the field of view (with the centre shift): LiTS bodies are rarely cut
    room_x = scan.fov / 2 - 15.0 - abs(scan.shift[1])
    room_y = scan.fov / 2 - 15.0 + min(scan.shift[0], 0.0)
    a = min(rng.uniform(135.0, 180.0), room_x)
    b = a * rng.uniform(0.66, 0.8)
    fat = rng.uniform(0.04, 0.22) * a  # thin to obese, in proportion to the body
    fat_post = fat * rng.uniform(0.4, 0.8) + 4.0
    b_post = b * rng.uniform(0.88, 0.96)
    vb_x = rng.uniform(19.0, 24.0)
    return _Frame(a=a, b_ant=min(b * rng.uniform(1.0, 1.1), room_y), b_post=b_post,
                  p_ant=rng.uniform(2.0, 2.4), p_post=rng.uniform(2.6, 3.2), fat=fat, fat_post=fat_post,
                  wall=rng.uniform(7.0, 11.0), wall_post=rng.uniform(8.0, 14.0),
                  outline=_Field.sample(rng, 200.0, modes=3),
                  wobble=(rng.uniform(0.0, 0.02), rng.uniform(250.0, 500.0), rng.uniform(0, 2 * np.pi)),
                  y_vb=b_post - fat_post - rng.uniform(60.0, 70.0), vb=(vb_x * 0.75, vb_x),
                  s=rng.uniform(0.88, 1.12), sl=rng.uniform(0.85, 1.15), dome=rng.uniform(85.0, 100.0))


# ----------------------------------------------------------------------------- body wall, thorax, bone

_LAYER_CODES = np.array([TISSUE_CODES[n] for n in ("air", "skin", "fat", "muscle", "visceral_fat")], np.uint8)


@dataclass(frozen=True)
class _Ribs:
    z12: float  # z where the 12th rib leaves the spine
    period: float  # vertical rib spacing at the back (one vertebral level)
    drop: float  # how far a rib descends from the back to the front
    hz: float  # half height and half thickness of a rib's cross-section
    hd: float
    d0: float  # rib centre outside the cavity boundary (mm)


def _superellipse(f: _Frame, semi: tuple[float, float, float], girth: np.ndarray,
                  y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """|x/a|^p + |y/b|^p (< 1 inside) of a body layer, front and back with their own b and p."""
    a, b_ant, b_post = semi
    g = girth.reshape(-1, 1, 1)
    front = y < 0
    ax = np.abs(x) / (a * g)
    by = np.abs(y) / (np.where(front, b_ant, b_post) * g)
    p = np.where(front, f.p_ant, f.p_post).astype(np.float32)
    return np.where(front, ax ** np.float32(f.p_ant), ax ** np.float32(f.p_post)) + by ** p


@dataclass(frozen=True)
class _Section:
    """The body's axial cross-section at one girth: layer codes and, for the ribs, the
    pixels of a band around the cavity boundary with their depth and angle."""

    codes: np.ndarray  # (ny, nx) uint8
    yi: np.ndarray  # band pixel rows / columns
    xi: np.ndarray
    across: np.ndarray  # ((depth outside the cavity - rib offset) / rib half-thickness)^2
    alpha: np.ndarray  # angle from the spine, / pi (0 at the back, 1 at the front)


def _body_section(f: _Frame, ribs: _Ribs, girth: float, grid: _Grid, bump: np.ndarray) -> _Section:
    y, x = grid.y[None, :, None], grid.x[None, None, :]
    g = np.array([girth], np.float32)
    layers = [_superellipse(f, semi, g, y, x)[0] + bump for semi in f.layers()]
    count = sum((layer < 1.0).astype(np.uint8) for layer in layers)
    f_cav = layers[3]
    yi, xi = np.nonzero((f_cav > 0.9) & (f_cav < 1.5))
    yy, xx = grid.y[yi], grid.x[xi]
    rho = f_cav[yi, xi] ** (1.0 / np.where(yy < 0, f.p_ant, f.p_post))
    depth = (rho - 1.0) * np.hypot(xx, yy) / rho  # approximate mm outside the cavity boundary
    return _Section(codes=_LAYER_CODES[count], yi=yi, xi=xi, across=((depth - ribs.d0) / ribs.hd) ** 2,
                    alpha=np.arctan2(np.abs(xx), yy) / np.pi)


def _paint_body(canvas: _Canvas, f: _Frame, ribs: _Ribs) -> None:
    """Skin, subcutaneous fat, wall muscle and peritoneal fat; lungs, diaphragm and ribs.
    The girth changes slowly along z, so sections are computed once per 0.2 % of girth
    (under 0.4 mm) and reused: this is the largest saving in the whole phantom."""
    grid = canvas.grid
    mediastinum = ((grid.x[None, :] - 5.0) / (30.0 * f.s)) ** 2 + ((grid.y[:, None] - f.y_vb + 25.0) / 40.0) ** 2 < 1
    # one bump for all layers, so they stay nested; clipped so the body stays in the FOV
    bump = np.float32(0.05) * np.clip(f.outline(np.zeros(1, np.float32), grid.y, grid.x)[0], -2.0, 2.0)
    keys = np.round(f.girth(grid.z) / 0.002).astype(int)
    sections: dict[int, _Section] = {}
    for chunk in grid.chunks(grid.full()):
        region = canvas.tissue[chunk]
        for k, (zk, key) in enumerate(zip(grid.z[chunk[0]], keys[chunk[0]])):
            if key not in sections:
                sections[key] = _body_section(f, ribs, key * 0.002, grid, bump)
            region[k] = sections[key].codes
            _paint_ribs(region[k], float(zk), sections[key], ribs)
        _paint_thorax(region, grid.z[chunk[0]][:, None, None], canvas.dome, mediastinum)


def _paint_thorax(region: np.ndarray, z: np.ndarray, dome: np.ndarray, mediastinum: np.ndarray) -> None:
    """Lungs above the diaphragm (a 4 mm muscle sheet over the domes), except the mediastinum."""
    if z.max() <= dome.min():
        return
    fat = region == TISSUE_CODES["visceral_fat"]
    above = z - dome[None]
    region[fat & (above > 0) & (above <= 4.0)] = TISSUE_CODES["muscle"]
    region[fat & (above > 4.0) & ~mediastinum[None]] = TISSUE_CODES["lung"]


def _paint_ribs(plane: np.ndarray, z: float, section: _Section, ribs: _Ribs) -> None:
    """Oblique rib cross-sections in one slice: each rib descends from the back to the
    front, so an axial slice cuts it into short arcs near the cavity boundary."""
    if z < ribs.z12 - ribs.drop - 10.0:
        return
    alpha = section.alpha
    level = (z + ribs.drop * alpha ** 1.3 - ribs.z12) / ribs.period
    nearest = np.round(level)
    number = 12 - nearest
    end = np.select([number <= 7, number <= 10, number == 11], [0.9, 0.8, 0.55], 0.45)
    rr = ((level - nearest) * ribs.period / ribs.hz) ** 2 + section.across
    rib = (rr < 1.0) & (nearest >= 0) & (number >= 1) & (alpha > 0.2) & (alpha < end)
    cartilage = (number <= 10) & (alpha > end - 0.15)
    code = np.where(cartilage, TISSUE_CODES["cartilage"],
                    np.where(rr > 0.45, TISSUE_CODES["cortical_bone"], TISSUE_CODES["cancellous_bone"]))
    plane[section.yi[rib], section.xi[rib]] = code[rib]


def _sample_ribs(rng: np.random.Generator, f: _Frame) -> _Ribs:
    return _Ribs(z12=rng.uniform(-55.0, -35.0) * f.s, period=rng.uniform(26.0, 32.0) * f.s,
                 drop=rng.uniform(120.0, 160.0), hz=rng.uniform(4.0, 5.5), hd=rng.uniform(3.5, 4.5),
                 d0=rng.uniform(2.0, 5.0))


def _paint_table(canvas: _Canvas, rng: np.random.Generator, f: _Frame) -> None:
    """The CT couch under the back: two thin shells around a foam core, curved at the edges."""
    grid = canvas.grid
    top = f.b_post + rng.uniform(0.0, 8.0)
    depth = grid.y[:, None] - (top - 0.0006 * grid.x[None, :] ** 2)
    within = np.abs(grid.x[None, :]) < 220.0
    shell = within & (((depth >= 0) & (depth < 3)) | ((depth >= 35) & (depth < 38)))
    foam = within & (depth >= 3) & (depth < 35)
    for chunk in grid.chunks(grid.full()):
        region = canvas.tissue[chunk]
        air = region == TISSUE_CODES["air"]
        region[air & shell[None]] = TISSUE_CODES["table_shell"]
        region[air & foam[None]] = TISSUE_CODES["table_foam"]


def _add_trunk_muscles(canvas: _Canvas, rng: np.random.Generator, f: _Frame) -> None:
    """Paraspinal muscles either side of the spinous processes, quadratus lumborum below the
    ribs, and the two recti in the front wall with the linea alba between them."""
    back = f.b_post - f.fat_post - f.wall_post
    top = f.y_vb + f.vb[0] + 6.0
    onto = _codes("visceral_fat", "lung")
    size = rng.uniform(0.85, 1.15)
    front = -(f.b_ant - f.fat) + 1.0
    for side in (-1, 1):
        erector = _tube([(-400, (top + back) / 2 + 4, side * 30 * size), (400, (top + back) / 2, side * 27 * size)],
                        [((back - top) / 2 + 4, 26 * size), ((back - top) / 2 + 4, 22 * size)])
        canvas.solid(erector, [(1.0, "muscle")], onto)
        quadratus = _tube([(-400, f.y_vb + 22, side * (f.vb[1] + 52)), (-60, f.y_vb + 28, side * (f.vb[1] + 48)),
                           (-20, f.y_vb + 30, side * (f.vb[1] + 45))], [(13, 22), (11, 18), (1, 1)])
        canvas.solid(quadratus, [(1.0, "muscle")], onto)
        rectus = _tube([(-400, front + 7, side * 40 * size), (f.dome, front + 6, side * 38 * size)],
                       [(8, 30 * size), (6, 28 * size)])
        canvas.solid(rectus, [(1.0, "muscle")], _codes("visceral_fat", "fat"))


def _vertebra_maps(grid: _Grid, f: _Frame, lumbar: bool) -> dict[str, np.ndarray]:
    """2D code maps (0 = leave) of one vertebra around the spine's centre: the body level
    with and without its processes, the endplate and the disc level."""
    y, x = grid.y[:, None] - f.y_vb, grid.x[None, :]
    sy, sx = f.vb
    shell = 2.0 / sy
    body = (np.abs(x) / sx) ** 2.4 + (np.abs(y) / sy) ** 2.4
    canal_y, canal_r = sy + 9.0, 8.5
    ring = np.hypot(x, y - canal_y)
    arch = (ring >= canal_r) & (ring < canal_r + 6.0) & (y > sy - 6.0)
    spinous = (np.abs(x) < 3.5) & (y > canal_y + canal_r) & (y < canal_y + canal_r + 28.0)
    transverse = (np.abs(y - canal_y + 2.0) < 3.5) & (np.abs(x) < (45.0 if lumbar else 28.0)) & (y > sy - 4)
    pixel = float(grid.x[1] - grid.x[0]) if len(grid.x) > 1 else 1.0
    codes = {name: TISSUE_CODES[name] for name in ("cortical_bone", "cancellous_bone", "disc", "csf")}

    def elements(mask: np.ndarray) -> np.ndarray:
        inner = ndi.binary_erosion(mask, iterations=max(1, round(1.5 / pixel)))
        return np.where(inner, codes["cancellous_bone"], np.where(mask, codes["cortical_bone"], 0))

    canal = np.where(ring < canal_r, codes["csf"], 0)
    cortex = body > (1.0 - shell) ** 2.4
    vb = np.where(body < 1.0, np.where(cortex, codes["cortical_bone"], codes["cancellous_bone"]), 0)
    full = np.maximum(vb, elements(arch | spinous | transverse))
    return {
        "body": np.where(canal > 0, canal, full).astype(np.uint8),
        "spinous": np.where(canal > 0, canal, np.maximum(vb, elements(arch | spinous))).astype(np.uint8),
        "bare": np.where(canal > 0, canal, np.maximum(vb, elements(arch))).astype(np.uint8),
        "endplate": np.where(canal > 0, canal, np.where(body < 1.0, codes["cortical_bone"],
                                                         elements(arch))).astype(np.uint8),
        "disc": np.where(canal > 0, canal, np.where(body < 1.0, codes["disc"], elements(arch))).astype(np.uint8),
    }


def _paint_spine(canvas: _Canvas, rng: np.random.Generator, f: _Frame, ribs: _Ribs) -> None:
    """Vertebrae repeating every level along z: bodies with cortical endplates, discs, and
    the posterior elements over the middle of each level."""
    grid = canvas.grid
    period = rng.uniform(28.0, 34.0) * f.s
    offset = rng.uniform(0.0, period)
    box = grid.box((grid.z[0], f.y_vb - f.vb[0] - 4, -60.0), (grid.z[-1], f.y_vb + f.vb[0] + 75, 60.0))
    if box is None:
        return
    sub = _Grid(grid.z, grid.y[box[1]], grid.x[box[2]])
    maps = {lumbar: _vertebra_maps(sub, f, lumbar) for lumbar in (True, False)}
    plate = 1.5 / period
    for k, zk in enumerate(grid.z):
        phase = ((zk - offset) / period) % 1.0
        level = maps[bool(zk < ribs.z12)]
        if phase < 0.22:
            name = "disc"
        elif phase < 0.22 + plate or phase > 1.0 - plate:
            name = "endplate"
        else:
            name = "body" if 0.45 < phase < 0.7 else ("spinous" if 0.3 < phase < 0.9 else "bare")
        region = canvas.tissue[k, box[1], box[2]]
        bone = level[name] > 0
        region[bone] = level[name][bone]


# ----------------------------------------------------------------------------- organs

_ONTO_TUBE = _codes("visceral_fat", "lung", "muscle")
_ONTO_HEART = _codes("visceral_fat", "lung")
_ONTO_LATE = _codes("visceral_fat", "liver", "gut_wall", "gut_fluid", "feces", "gas", "pancreas")


def _add_great_vessels_and_psoas(canvas: _Canvas, rng: np.random.Generator, f: _Frame) -> None:
    """Aorta (left of the midline, in front of the spine, curving back in the chest), the
    common iliac arteries below its bifurcation, both psoas muscles and the diaphragm crura."""
    yv, r = f.y_vb, rng.uniform(10.0, 13.0)
    aorta = _tube([(-215, yv - 28, 8), (-60, yv - 32, 10), (f.dome - 30, yv - 28, 13),
                   (f.dome + 30, yv - 14, 20), (f.dome + 300, yv - 10, 24)], [r, r, r, r * 1.1, r * 1.1])
    canvas.solid(aorta, [(1.0, "aorta")], _ONTO_TUBE)
    for side in (-1, 1):
        iliac = _tube([(-360, yv - 10, 8 + side * 60), (-210, yv - 28, 8 + side * 5)], r * 0.65)
        canvas.solid(iliac, [(1.0, "aorta")], _ONTO_TUBE)
        vb = f.vb[1]
        psoas = _tube([(-360, yv - 12, side * (vb + 32)), (-150, yv - 4, side * (vb + 18)),
                       (-40, yv, side * (vb + 6))], [(20, 24), (15, 17), (4, 5)])
        canvas.solid(psoas, [(1.0, "muscle")], _codes("visceral_fat"))
        crus = _tube([(-75, yv - 17, side * 15), (f.dome - 25, yv - 24, side * 20)], 5.0)
        canvas.solid(crus, [(1.0, "muscle")], _codes("visceral_fat"))


def _add_ivc(canvas: _Canvas, f: _Frame) -> None:
    """Inferior vena cava, right of the aorta, through the back of the liver into the heart."""
    yv = f.y_vb
    ivc = _tube([(-360, yv - 20, -25), (-60, yv - 25, -25), (-10, yv - 32, -28), (f.dome - 20, yv - 36, -24),
                 (f.dome + 25, yv - 48, -10)], [(9, 13), (10, 13), (11, 13), (12, 14), (12, 14)])
    canvas.solid(ivc, [(1.0, "ivc")], _codes("visceral_fat", "liver", "lung", "muscle"))


def _add_heart(canvas: _Canvas, rng: np.random.Generator, f: _Frame) -> None:
    """Heart resting on the diaphragm, front and left: myocardium around the blood pool."""
    size = f.a_c / 125.0 * rng.uniform(0.9, 1.1)
    heart = _ellipsoid((f.dome + 40.0, f.y_ant + 55.0, 25.0), (55 * size, 48 * size, 62 * size),
                       angle=rng.uniform(-0.7, -0.3))
    canvas.solid(heart, [(1.0, "myocardium"), ((1 - 11 / (48 * size)) ** 2, "heart_blood")], _ONTO_HEART, side=1)


def _add_spleen(canvas: _Canvas, rng: np.random.Generator, f: _Frame) -> None:
    """Spleen against the left posterolateral wall under the left dome, long axis along the ribs."""
    size = f.s * rng.uniform(0.8, 1.2)
    spleen = _ellipsoid((f.dome - 55.0, f.y_vb - 8.0, f.a_c - 40.0 * size), (50 * size, 42 * size, 22 * size),
                        angle=rng.uniform(0.55, 0.95), taper=0.3)
    field = _Field.sample(rng, 60.0)
    canvas.solid(spleen, [(1.0, "spleen")], _codes("visceral_fat"), field, rng.uniform(0.1, 0.25), side=-1)


def _add_kidney(canvas: _Canvas, rng: np.random.Generator, f: _Frame, side: int, onto: np.ndarray) -> None:
    """Kidney (side +1 left, -1 right): cortex shell, patchy medulla, sinus fat and pelvis
    opening to the hilum, which faces front and inwards; upper pole tilted inwards."""
    size = f.s * rng.uniform(0.9, 1.1)
    cz = (-40.0 if side > 0 else -58.0) * f.s + rng.uniform(-10, 10)
    kidney = _ellipsoid((cz, f.y_vb + 8.0, side * (f.vb[1] + 42.0 * size)), (55 * size, 24 * size, 29 * size),
                        angle=side * rng.uniform(0.4, 0.8), lean=(-10.0, side * 15.0))
    hilum = np.array([-0.8, -side * 1.0], np.float32) / np.float32(np.hypot(0.8, 1.0))  # (y, x)
    field = _Field.sample(rng, 18.0)
    for chunk, (z, y, x), r2 in canvas.shape_chunks(kidney):
        region = canvas.tissue[chunk]
        inside = (r2 < 1.0) & onto[region]
        centre = kidney.z, kidney.cy, kidney.cx
        dy = y - np.interp(z.ravel(), centre[0], centre[1]).astype(np.float32)[:, None, None]
        dx = x - np.interp(z.ravel(), centre[0], centre[2]).astype(np.float32)[:, None, None]
        towards = np.maximum(dy * hilum[0] + dx * hilum[1], 0.0) / np.float32(24 * size)
        middle = 1.0 - ((z - cz) / np.float32(55 * size)) ** 2 / 0.16  # > 0 in the middle 40 %
        core = r2 - 0.8 * towards  # the sinus bulges towards, and opens at, the hilum
        medulla = (r2 < 0.55) & (field(z, y, x) > -0.3)
        region[inside] = TISSUE_CODES["kidney_cortex"]
        region[inside & medulla] = TISSUE_CODES["kidney_medulla"]
        region[inside & (core < 0.25 * middle)] = TISSUE_CODES["visceral_fat"]
        region[inside & (core < 0.08 * middle)] = TISSUE_CODES["urine"]


def _add_stomach(canvas: _Canvas, rng: np.random.Generator, f: _Frame) -> None:
    """Stomach under the left dome: 4 mm wall, fluid with a gas cap on top (the patient lies supine)."""
    fill = f.s * rng.uniform(0.75, 1.15)
    semi = (60 * fill, 40 * fill, 45 * fill)
    centre = (f.dome - 70.0, f.y_ant + 45.0 * fill, 0.4 * f.a_c)
    stomach = _ellipsoid(centre, semi, angle=rng.uniform(0.0, 0.5), lean=(-10.0, -rng.uniform(25, 45)))
    inner = (1.0 - 4.0 / semi[1]) ** 2
    gas_level = centre[1] - semi[1] + rng.uniform(0.0, 0.9) * semi[1]
    field = _Field.sample(rng, 50.0)
    for chunk, (z, y, _), r2 in canvas.shape_chunks(stomach, field, 0.15):
        region = canvas.tissue[chunk]
        wall = (r2 < 1.0) & _ONTO_FAT[region] & canvas.side_of_dome(chunk, z, -1)
        lumen = wall & (r2 < inner)
        region[wall] = TISSUE_CODES["gut_wall"]
        region[lumen & (y < gas_level)] = TISSUE_CODES["gas"]
        region[lumen & (y >= gas_level)] = TISSUE_CODES["gut_fluid"]


def _porta(f: _Frame) -> np.ndarray:
    """The porta hepatis (z, y, x): where the portal vein enters the liver."""
    return np.array([-8.0 * f.sl, (f.y_ant + f.y_vb) / 2 + 5.0, -0.3 * f.a_c - 5.0])


def _add_pancreas_and_veins(canvas: _Canvas, rng: np.random.Generator, f: _Frame) -> None:
    """Pancreas from the head (right, by the duodenum) to the tail at the splenic hilum; the
    splenic vein behind it joins the portal vein, which runs up to the porta hepatis."""
    yv, jitter = f.y_vb, rng.uniform(-8, 8, (4, 3))
    path = np.array([(-45, yv - 42, -30), (-30, yv - 52, 0), (-20, yv - 42, 45),
                     (-5, yv - 12, 0.72 * f.a_c - 25)], dtype=float) + jitter
    radii = np.array([15.0, 10.0, 10.0, 8.0]) * rng.uniform(0.8, 1.1)
    onto = _codes("visceral_fat")
    for a, b, ra, rb in zip(path[:-1], path[1:], radii[:-1], radii[1:]):
        canvas.capsule(a, b, ra, rb, "pancreas", onto)
    behind = np.array([0.0, 11.0, 0.0])
    confluence = path[1] + np.array([-2.0, 12.0, -2.0])
    veins = _codes("visceral_fat", "pancreas")
    for a, b in zip(path[2:-1] + behind, path[3:] + behind):
        canvas.capsule(a, b, 4.5, 4.5, "portal_vein", veins)
    canvas.capsule(path[2] + behind, confluence, 4.5, 6.0, "portal_vein", veins)
    canvas.capsule(confluence, _porta(f), 7.0, 6.5, "portal_vein", veins)


def _gut_tube(canvas: _Canvas, rng: np.random.Generator, knots: np.ndarray, radius: float, wall: float,
              content: str) -> None:
    """A bowel segment through knots: wall first along the whole path, then the lumen, so
    consecutive segments join into one tube. Faeces get a few gas bubbles."""
    onto_wall, onto_lumen = _codes("visceral_fat"), _codes("gut_wall")
    canvas.polyline(knots, radius, "gut_wall", onto_wall)
    if radius - wall > 0.5:
        canvas.polyline(knots, radius - wall, content, onto_lumen)
    bubbles = rng.integers(2, 7) if content == "feces" else 0
    for _ in range(bubbles):
        seg = int(rng.integers(len(knots) - 1))
        at = knots[seg] + rng.random() * (knots[seg + 1] - knots[seg]) + rng.uniform(-0.4, 0.4, 3) * radius
        size = rng.uniform(2.0, 0.5 * radius)
        canvas.capsule(at, at + rng.uniform(-4, 4, 3), size, size, "gas", _codes("feces"))


def _wiggle(rng: np.random.Generator, knots: np.ndarray, amount: float) -> np.ndarray:
    """Jitter knots and add a jittered midpoint between each pair: tortuous, not straight."""
    knots = knots + rng.uniform(-amount, amount, knots.shape)
    mids = (knots[:-1] + knots[1:]) / 2 + rng.uniform(-amount, amount, (len(knots) - 1, 3))
    out = np.empty((2 * len(knots) - 1, 3))
    out[0::2], out[1::2] = knots, mids
    return out


def _add_bowel(canvas: _Canvas, rng: np.random.Generator, f: _Frame) -> None:
    """Colon around the periphery (hepatic and splenic flexures up by the liver and spleen),
    the duodenal C-loop around the pancreatic head, and small-bowel loops in the lower abdomen."""
    a, yv, ya = f.a_c, f.y_vb, f.y_ant
    colon = np.array([(-260, yv - 40, -0.65 * a), (-170, yv - 30, -0.72 * a), (-100, ya + 55, -0.62 * a),
                      (-115, ya + 32, -0.2 * a), (-120, ya + 32, 0.25 * a), (-40, yv - 45, 0.72 * a),
                      (-150, yv - 40, 0.78 * a), (-260, yv - 35, 0.72 * a), (-330, ya + 60, 0.3 * a)])
    _gut_tube(canvas, rng, _wiggle(rng, colon, 10.0), rng.uniform(16.0, 24.0), 3.0, "feces")
    duodenum = np.array([(-40, ya + 55, -5), (-50, yv - 42, -45), (-85, yv - 38, -48),
                         (-100, yv - 42, -5), (-90, yv - 44, 25)])
    _gut_tube(canvas, rng, _wiggle(rng, duodenum, 5.0), rng.uniform(9.0, 13.0), 2.5,
              "gas" if rng.random() < 0.3 else "gut_fluid")
    _add_mesenteric_vessels(canvas, f)
    regions = [((-330.0, ya + 20.0, -0.6 * a), (-70.0, yv - 25.0, 0.6 * a), rng.integers(20, 30)),
               ((-120.0, ya + 25.0, 0.1 * a), (-15.0, yv - 30.0, 0.7 * a), rng.integers(4, 8))]  # jejunum, LUQ
    for lo, hi, loops in regions:
        for _ in range(int(loops)):
            kind = rng.random()
            radius = rng.uniform(9.0, 15.0) if kind < 0.75 else rng.uniform(5.0, 7.0)
            content = "gas" if 0.6 <= kind < 0.72 else "gut_fluid"
            lo_, hi_ = np.array(lo), np.array(hi)
            walk = _random_walk(rng, lo_, np.maximum(hi_, lo_ + 10.0), int(rng.integers(8, 15)))
            _gut_tube(canvas, rng, walk, radius, 2.5, content)


def _add_mesenteric_vessels(canvas: _Canvas, f: _Frame) -> None:
    """Superior mesenteric artery and vein: the bright dots in the mesentery, SMV to the
    right of the SMA, joining the portal confluence behind the pancreatic neck."""
    yv, ya = f.y_vb, f.y_ant
    onto = _codes("visceral_fat")
    artery = np.array([(-45, yv - 36, 10), (-70, yv - 58, 8), (-160, ya + 55, -5), (-260, ya + 50, -25)])
    vein = np.array([(-260, ya + 48, -40), (-160, ya + 52, -22), (-70, yv - 60, -12), (-32, yv - 42, -2)])
    for a, b in zip(artery[:-1], artery[1:]):
        canvas.capsule(a, b, 4.0, 3.5, "aorta", onto)
    for a, b in zip(vein[:-1], vein[1:]):
        canvas.capsule(a, b, 4.0, 5.5, "portal_vein", onto)


def _random_walk(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, steps: int) -> np.ndarray:
    """A persistent random walk of ~25 mm steps that bounces off the box [lo, hi]."""
    points = [rng.uniform(lo, hi)]
    heading = rng.standard_normal(3)
    for _ in range(steps):
        heading = heading / np.linalg.norm(heading) + 0.8 * rng.standard_normal(3)
        step = points[-1] + heading / np.linalg.norm(heading) * rng.uniform(20.0, 30.0)
        heading = np.where((step < lo) | (step > hi), -heading, heading)
        points.append(np.clip(step, lo, hi))
    return np.array(points)
