"""One synthetic dermoscopy-like picture: a lesion's fixed look (`make_lesion`) and one photograph of it (`render`).

Each picture carries its class in what a dermatologist looks at: colour and darkness, shape regularity,
border sharpness, texture (globules, streaks, vessels, scale, lacunae) and size. Every cue is drawn from
overlapping class distributions and buried in nuisance variation (skin tone, illumination, position,
rotation, scale, hair, vignetting, noise), so no single pixel decides the class, yet a small CNN learns
it at 64 px. Cues are coarse on purpose: they must survive the demo's downscale to 72 px. Pictures are
rendered at half resolution with numpy and upscaled. `render` can also return the lesion's region, which
the Grad-CAM test uses as ground truth for where a heat map should point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

WIDTH, HEIGHT = 600, 450
_RW, _RH = WIDTH // 2, HEIGHT // 2  # render resolution


@dataclass
class _Lesion:
    """Everything that stays the same across photographs of one lesion (lengths in lesion radii)."""

    radius: float  # pixels at render resolution
    aspect: float
    harmonics: np.ndarray  # rows of (k, amplitude, phase): the irregularity of the outline
    softness: float  # border width relative to the radius
    core: np.ndarray  # RGB in [0, 1] at the centre ...
    rim: np.ndarray  # ... and at the edge
    gamma: int  # how fast the colour moves from core to rim (1 or 2)
    opacity: float
    blotch: np.ndarray | None = None  # RGB of blotches (blue-grey veil, scale, mottling)
    blotch_strength: float = 0.0
    noise: Image.Image | None = None  # where blotches lie: a smooth random field over [-1.3, 1.3]^2 ('F' mode)
    layers: list[tuple[np.ndarray, float, list]] = field(default_factory=list)  # (RGB, opacity, shapes)
    skin: np.ndarray = field(default_factory=lambda: np.array([0.85, 0.68, 0.58]))


def _rgb(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def _inside(rng: np.random.Generator, n: int, r_max: float) -> np.ndarray:
    """n points uniformly inside the disk of radius r_max (lesion units, before the aspect squeeze)."""
    r = r_max * np.sqrt(rng.uniform(0, 1, n))
    a = rng.uniform(0, 2 * np.pi, n)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _dots(rng: np.random.Generator, n: tuple[int, int], r_max: float, size: tuple[float, float]) -> list:
    """Globules, cysts, nests or lacunae: between n[0] and n[1] discs inside r_max."""
    return [("dot", p, rng.uniform(*size)) for p in _inside(rng, int(rng.integers(*n)), r_max)]


def _vessels(rng: np.random.Generator) -> list:
    """Arborizing vessels: random walks that branch, thinner at each generation."""
    shapes = []
    stack = [(p, rng.uniform(0, 2 * np.pi), 0) for p in _inside(rng, int(rng.integers(2, 4)), 0.5)]
    while stack:
        p, heading, depth = stack.pop()
        points = [p]
        for _ in range(int(rng.integers(4, 8))):
            heading += rng.normal(0, 0.45)
            p = p + 0.13 * np.array([np.cos(heading), np.sin(heading)])
            points.append(p)
            if depth < 2 and rng.uniform() < 0.18:
                stack.append((p, heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1), depth + 1))
        shapes.append(("line", np.array(points), 0.065 / (1 + depth)))
    return shapes


def _streaks(rng: np.random.Generator, n: int) -> list:
    """Radial streaks (pseudopods) crossing the border."""
    shapes = []
    for a in rng.uniform(0, 2 * np.pi, n):
        unit = np.array([np.cos(a), np.sin(a)])
        shapes.append(("line", np.array([rng.uniform(0.65, 0.85) * unit, rng.uniform(1.0, 1.2) * unit]), 0.045))
    return shapes


def _harmonics(rng: np.random.Generator, ks: range, amp: tuple[float, float]) -> np.ndarray:
    """Outline wobble: amplitude falls with frequency, so the shape stays lesion-like."""
    return np.array([(k, rng.uniform(*amp) / math.sqrt(k), rng.uniform(0, 2 * np.pi)) for k in ks])


def _skin(rng: np.random.Generator) -> np.ndarray:
    light, dark = _rgb(0.94, 0.80, 0.72), _rgb(0.60, 0.42, 0.31)
    return light + (dark - light) * rng.beta(1.3, 3.0)


def make_lesion(rng: np.random.Generator, dx: str) -> _Lesion:
    """Draw one lesion of class dx: the class-dependent part of the picture (dermoscopic clichés)."""
    u = rng.uniform

    def noise(n: int) -> Image.Image:  # blotches about 2.6 / n lesion radii wide
        grid = Image.fromarray(rng.uniform(0, 1, (n, n)).astype(np.float32), mode="F")
        return grid.resize((8 * n, 8 * n), Image.BICUBIC)

    if dx == "nv":  # regular, round, uniformly brown of any darkness; sometimes faint globules
        shade = u(0.55, 1.35)
        les = _Lesion(
            radius=u(45, 75),
            aspect=u(0.8, 1.0),
            harmonics=_harmonics(rng, range(2, 4), (0.0, 0.06)),
            softness=u(0.04, 0.10),
            core=_rgb(0.42, 0.26, 0.16) / shade,
            rim=_rgb(0.58, 0.40, 0.28) / shade,
            gamma=2,
            opacity=u(0.85, 1.0),
        )
        if u() < 0.5:
            les.layers.append((les.core * 0.7, 0.5, _dots(rng, (4, 10), 0.7, (0.04, 0.07))))
    elif dx == "mel":  # large, irregular, dark, multicoloured: blue-grey veil, black blotches, streaks
        les = _Lesion(
            radius=u(60, 95),
            aspect=u(0.65, 1.0),
            harmonics=_harmonics(rng, range(2, 8), (0.08, 0.2)),
            softness=u(0.02, 0.12),
            core=_rgb(0.16, 0.09, 0.07) * u(0.7, 1.4),
            rim=_rgb(0.45, 0.28, 0.18) * u(0.8, 1.2),
            gamma=1,
            opacity=1.0,
            blotch=_rgb(0.38, 0.42, 0.55) * u(0.8, 1.15),
            blotch_strength=u(0.5, 0.85),
            noise=noise(6),
        )
        les.layers.append((_rgb(0.06, 0.04, 0.05), 0.9, _dots(rng, (3, 8), 0.8, (0.06, 0.14))))
        if u() < 0.7:
            les.layers.append((_rgb(0.12, 0.07, 0.06), 0.8, _streaks(rng, int(rng.integers(6, 16)))))
    elif dx == "bkl":  # stuck-on: sharp border, tan to brown, mottled; milia-like cysts, comedo openings
        shade = u(0.75, 1.3)
        les = _Lesion(
            radius=u(45, 80),
            aspect=u(0.65, 1.0),
            harmonics=_harmonics(rng, range(2, 5), (0.03, 0.1)),
            softness=u(0.005, 0.03),
            core=_rgb(0.62, 0.47, 0.30) / shade,
            rim=_rgb(0.70, 0.55, 0.36) / shade,
            gamma=1,
            opacity=u(0.85, 1.0),
            blotch=_rgb(0.45, 0.32, 0.20) / shade,
            blotch_strength=u(0.4, 0.7),
            noise=noise(8),
        )
        les.layers.append((_rgb(0.96, 0.93, 0.80), 0.9, _dots(rng, (6, 14), 0.8, (0.03, 0.06))))
        les.layers.append((_rgb(0.20, 0.13, 0.08), 0.8, _dots(rng, (3, 9), 0.8, (0.03, 0.06))))
    elif dx == "bcc":  # pearly pink, translucent, blurry; arborizing vessels, blue-grey ovoid nests
        les = _Lesion(
            radius=u(40, 70),
            aspect=u(0.65, 1.0),
            harmonics=_harmonics(rng, range(2, 5), (0.03, 0.12)),
            softness=u(0.10, 0.20),
            core=_rgb(0.92, 0.62, 0.66),
            rim=_rgb(0.88, 0.58, 0.58),
            gamma=1,
            opacity=u(0.75, 0.95),
        )
        les.layers.append((_rgb(0.72, 0.08, 0.14), 0.95, _vessels(rng)))
        if u() < 0.7:
            les.layers.append((_rgb(0.32, 0.36, 0.48), 0.8, _dots(rng, (2, 6), 0.7, (0.08, 0.14))))
    elif dx == "akiec":  # red-pink, flat, ill-defined, irregular; white-yellow scale
        les = _Lesion(
            radius=u(40, 75),
            aspect=u(0.65, 1.0),
            harmonics=_harmonics(rng, range(2, 6), (0.06, 0.15)),
            softness=u(0.12, 0.22),
            core=_rgb(0.78, 0.30, 0.28) * u(0.9, 1.1),
            rim=_rgb(0.82, 0.45, 0.40),
            gamma=1,
            opacity=u(0.7, 0.95),
            blotch=_rgb(0.95, 0.91, 0.78),
            blotch_strength=u(0.6, 0.9),
            noise=noise(12),
        )
    elif dx == "scc":  # keratinising: white-yellow central keratin, red rim, dotted and hairpin vessels
        les = _Lesion(
            radius=u(40, 70),
            aspect=u(0.7, 1.0),
            harmonics=_harmonics(rng, range(2, 5), (0.04, 0.12)),
            softness=u(0.06, 0.14),
            core=_rgb(0.93, 0.88, 0.70),
            rim=_rgb(0.80, 0.36, 0.32) * u(0.9, 1.1),
            gamma=2,
            opacity=u(0.8, 0.95),
        )
        les.layers.append((_rgb(0.70, 0.10, 0.14), 0.9, _dots(rng, (8, 16), 0.9, (0.02, 0.04))))
    elif dx == "df":  # small and firm: central white scar, faint brown ring, very soft border
        les = _Lesion(
            radius=u(25, 45),
            aspect=u(0.8, 1.0),
            harmonics=_harmonics(rng, range(2, 4), (0.0, 0.06)),
            softness=u(0.12, 0.22),
            core=_rgb(0.95, 0.90, 0.86),
            rim=_rgb(0.55, 0.36, 0.25) * u(0.8, 1.2),
            gamma=2,
            opacity=0.95,
        )
    elif dx == "vasc":  # red to purple, sharp, round; clustered darker lacunae
        purple = u(0, 1)
        base = _rgb(0.70, 0.12, 0.20) * (1 - purple) + _rgb(0.45, 0.14, 0.38) * purple
        les = _Lesion(
            radius=u(30, 55),
            aspect=u(0.8, 1.0),
            harmonics=_harmonics(rng, range(2, 4), (0.0, 0.08)),
            softness=u(0.01, 0.04),
            core=base * 0.8,
            rim=base,
            gamma=1,
            opacity=1.0,
        )
        les.layers.append((base * 0.55, 0.9, _dots(rng, (8, 16), 0.8, (0.08, 0.16))))
    else:
        raise ValueError(f"unknown class {dx!r}")
    les.skin = _skin(rng)
    return les


_GRID: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


def _grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel coordinates at render resolution, and the normalised distance from the centre (cached)."""
    global _GRID
    if _GRID is None:
        yy, xx = np.mgrid[0:_RH, 0:_RW].astype(np.float32)
        centre = np.sqrt((xx - _RW / 2) ** 2 + (yy - _RH / 2) ** 2) / (0.5 * math.hypot(_RW, _RH))
        _GRID = (xx, yy, centre)
    return _GRID


_NOISE: np.ndarray | None = None


def _noise_bank() -> np.ndarray:
    """Gaussian noise (sd 0.035) larger than a picture, the same in every process (cached)."""
    global _NOISE
    if _NOISE is None:
        _NOISE = np.random.default_rng(12345).standard_normal((2 * _RH, 2 * _RW), dtype=np.float32) * 0.035
    return _NOISE


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * x)  # no overflow, unlike 1 / (1 + exp(-x))


def render(
    les: _Lesion, rng: np.random.Generator, with_mask: bool = False
) -> Image.Image | tuple[Image.Image, np.ndarray]:
    """Photograph a lesion: one shot's pose, lighting, hair and noise around the lesion's fixed look.

    Lesion maths runs only in the window the lesion can reach, at half resolution; the picture is
    then upscaled and hair is drawn at full resolution. With `with_mask`, also the lesion's region
    (inside its outline) as a bool array [HEIGHT, WIDTH]: what a heat map should point at.
    """
    xx, yy, centre = _grid()
    u = rng.uniform
    cx, cy = _RW / 2 + u(-0.15, 0.15) * _RW, _RH / 2 + u(-0.15, 0.15) * _RH
    theta, scale = u(0, 2 * np.pi), les.radius * u(0.85, 1.15)
    cos, sin = math.cos(theta), math.sin(theta)
    reach = scale * (1 + float(np.abs(les.harmonics[:, 1]).sum())) * (1.25 + 5 * les.softness)
    x0, x1 = max(0, int(cx - reach)), min(_RW, int(cx + reach) + 1)
    y0, y1 = max(0, int(cy - reach)), min(_RH, int(cy + reach) + 1)

    # Pixel -> lesion coordinates (units of the lesion radius), inside the window. Arrays are
    # channel-first: numpy is several times slower on a trailing axis of length 3.
    wx, wy = xx[y0:y1, x0:x1] - cx, yy[y0:y1, x0:x1] - cy
    qu, qv = (cos * wx + sin * wy) / scale, (-sin * wx + cos * wy) / (scale * les.aspect)
    rho = np.sqrt(qu * qu + qv * qv) + 1e-6
    # The outline r(phi) = 1 + sum a_k cos(k phi + p_k), with cos(k phi + p) = Re(z^k e^{ip}), z = e^{i phi}:
    # complex powers are much cheaper than arctan2 and cos.
    z = np.empty(rho.shape, np.complex64)
    z.real, z.imag = qu / rho, qv / rho
    edge, zk, k_done = np.ones_like(rho), np.ones_like(z), 0
    for k, amp, phase in les.harmonics.tolist():
        for _ in range(int(k) - k_done):
            zk = zk * z
        k_done = int(k)
        edge += amp * (zk * complex(math.cos(phase), math.sin(phase))).real
    d = rho / edge
    alpha = les.opacity * _sigmoid((1 - d) / les.softness)
    region = np.zeros((_RH, _RW), dtype=bool)
    region[y0:y1, x0:x1] = d < 1
    t = np.clip(d, 0, 1) ** les.gamma
    lesion = les.core[:, None, None] + (les.rim - les.core)[:, None, None] * t
    if les.blotch is not None and les.noise is not None:
        # Sample the blotch field at each pixel's lesion coordinates: an affine map, done by PIL in C.
        n = les.noise.size[0] - 1
        g = 0.5 * n / 1.3  # lesion units -> grid pixels
        cu, cv = g * cos / scale, g * sin / scale
        su, sv = -g * sin / (scale * les.aspect), g * cos / (scale * les.aspect)
        ox, oy = x0 - cx, y0 - cy
        coeffs = (cu, cv, cu * ox + cv * oy + n / 2, su, sv, su * ox + sv * oy + n / 2)
        field_ = np.asarray(les.noise.transform((x1 - x0, y1 - y0), Image.AFFINE, coeffs, Image.BILINEAR))
        weight = les.blotch_strength * _sigmoid((field_ - 0.55) / 0.06)
        lesion += (les.blotch[:, None, None] - lesion) * weight

    # Skin with a colour cast under uneven lighting, sometimes the dermatoscope's dark circular rim.
    light = u(0.85, 1.12) + u(-0.25, 0.25) * (xx / _RW - 0.5) + u(-0.25, 0.25) * (yy / _RH - 0.5)
    if u() < 0.35:
        light *= _sigmoid((u(0.8, 1.0) - centre) / 0.03)
    skin = les.skin * rng.uniform(0.94, 1.06, 3).astype(np.float32)
    img = np.stack([light * c for c in skin.tolist()])
    win, win_light = img[:, y0:y1, x0:x1], light[y0:y1, x0:x1]
    win += (lesion * win_light - win) * alpha

    # Texture layers, drawn in window pixels from lesion-space shapes.
    cover = np.clip(alpha * 1.4, 0, 1)
    for color, opacity, shapes in les.layers:
        mask = Image.new("L", (x1 - x0, y1 - y0), 0)
        draw = ImageDraw.Draw(mask)
        for kind, pts, size in shapes:
            pts = np.atleast_2d(pts) * (1.0, les.aspect)
            px = cx - x0 + scale * (cos * pts[:, 0] - sin * pts[:, 1])
            py = cy - y0 + scale * (sin * pts[:, 0] + cos * pts[:, 1])
            r = max(1.0, size * scale)
            if kind == "dot":
                draw.ellipse((px[0] - r, py[0] - r, px[0] + r, py[0] + r), fill=255)
            else:
                draw.line(list(zip(px.tolist(), py.tolist(), strict=True)), fill=255, width=round(r), joint="curve")
        m = np.asarray(mask, dtype=np.float32) * (opacity / 255) * cover
        win += (color[:, None, None] * win_light - win) * m

    # Sensor noise: a random window of a fixed noise texture (drawing fresh normals costs more than the rest).
    bank = _noise_bank()
    oy, ox = int(rng.integers(0, bank.shape[0] - _RH)), int(rng.integers(0, bank.shape[1] - _RW))
    img += bank[oy : oy + _RH, ox : ox + _RW] * u(0.3, 1.0)
    planes = [Image.fromarray(p) for p in (np.clip(img, 0, 1) * 255).astype(np.uint8)]
    # Nearest-neighbour 2x upscaling is 10x faster than bilinear and invisible under the noise and JPEG.
    pic = Image.merge("RGB", planes).resize((WIDTH, HEIGHT), Image.NEAREST)

    if u() < 0.5:  # hair: dark curved strands at full resolution
        draw = ImageDraw.Draw(pic)
        for _ in range(int(rng.integers(1, 9))):
            p0, p2 = rng.uniform((0, 0), (WIDTH, HEIGHT), (2, 2))
            p1 = (p0 + p2) / 2 + rng.normal(0, 60, 2)
            s = np.linspace(0, 1, 12)[:, None]
            curve = (1 - s) ** 2 * p0 + 2 * (1 - s) * s * p1 + s**2 * p2
            shade = int(u(20, 70))
            draw.line([tuple(p) for p in curve.tolist()], fill=(shade, shade - 10, shade - 15), width=int(u(1, 4)))
    return (pic, region.repeat(2, axis=0).repeat(2, axis=1)) if with_mask else pic


def not_lesions(seed: int = 0, n: int = 30) -> dict[str, list[Image.Image]]:
    """`n` 600x450 images per kind that are not dermoscopic lesion images: random noise, flat colour, colour
    gradients, and synthetic skin with no lesion on it. What the out-of-distribution notice must catch; used by
    `skinlesion bench checks` and its test, so both measure the same images."""
    rng = np.random.default_rng(seed)

    def gradient() -> Image.Image:
        ramp = np.linspace(0, 1, 600)[None, :, None] * rng.uniform(0, 255, 3)
        ramp = ramp + np.linspace(0, 1, 450)[:, None, None] * rng.uniform(0, 255, 3)
        return Image.fromarray(np.clip(ramp / 2, 0, 255).astype(np.uint8))

    def skin(i: int) -> Image.Image:
        lesion = make_lesion(np.random.default_rng([5, i]), "nv")
        lesion.opacity, lesion.layers = 0.0, []
        return render(lesion, np.random.default_rng([6, i]))

    return {
        "noise": [Image.fromarray(rng.integers(0, 256, (450, 600, 3), dtype=np.uint8)) for _ in range(n)],
        "flat colour": [Image.new("RGB", (600, 450), tuple(map(int, rng.integers(0, 256, 3)))) for _ in range(n)],
        "gradient": [gradient() for _ in range(n)],
        "skin without a lesion": [skin(i) for i in range(n)],
    }
