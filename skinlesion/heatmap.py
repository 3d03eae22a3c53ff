"""The Grad-CAM heat map as the page shows it: its colours, its see-through low end, and its legend.

`skinlesion serve` makes two pictures of a map (`heat_map_pictures`) and sends the legend (`legend`) with the
model card, so the legend under every map is drawn by the function that drew the map. A map is made only for
an image not flagged as unfamiliar (serve decides; docs/serve.md, "The heat map").
"""

from __future__ import annotations

import base64
import io
from functools import cache

import numpy as np
import torch
from PIL import Image

CAM_FLOOR = 0.25  # heat-map values below this share of the peak are fully transparent
CAM_RAMP = (0.5, 0.95)  # the stretch of matplotlib's viridis the heat map uses: teal, green, yellow


def heat_colours(cam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RGB colours (uint8) and alpha of heat-map values in [0, 1]: viridis from teal through green to yellow,
    see-through below CAM_FLOOR of the peak and rising to 90% opaque at the peak.

    Not red: the lesions it is laid on are red, pink and brown, and a red map over a red lesion cannot be read
    (the map ran crimson to orange before). Not blue or white either, which dermoscopy reads as a blue-white
    veil or regression. Green is the strongest channel at every value, and viridis stays ordered for
    colour-blind readers."""
    from matplotlib import colormaps  # here, not at the top: serve starts without it until a map is drawn

    low, high = CAM_RAMP
    colours = (colormaps["viridis"](low + (high - low) * cam)[..., :3] * 255).astype(np.uint8)
    alpha = (np.clip((cam - CAM_FLOOR) / (1 - CAM_FLOOR), 0, 1) * 230).astype(np.uint8)
    return colours, alpha


def heat_map_pictures(image: torch.Tensor, cam: np.ndarray) -> dict[str, str]:
    """The heat map alone (RGBA, covering the model's crop: the page lays it over the user's own image inside
    the `crop` outline) and blended over the model's view of the image (uint8 [3, S, S])."""
    colours, alpha = heat_colours(cam)
    weight = alpha[..., None] / 255
    blended = ((1 - weight) * image.permute(1, 2, 0).numpy() + weight * colours).astype(np.uint8)
    return {
        "cam": png(Image.fromarray(blended)),
        "cam_overlay": png(Image.fromarray(np.dstack([colours, alpha]), "RGBA")),
    }


def png(image: Image.Image) -> str:
    """`image` as a PNG data URL: the API sends pictures inside its JSON."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@cache
def legend() -> dict[str, object]:
    """What /api/model tells the page about heat maps: the colour scale, low (left, see-through) to high
    (right), drawn by the function that draws every map; the floor below which a map is clear; what it means."""
    colours, alpha = heat_colours(np.tile(np.linspace(0, 1, 200), (12, 1)))
    return {
        "legend": png(Image.fromarray(np.dstack([colours, alpha]), "RGBA")),
        "floor": CAM_FLOOR,
        "meaning": "the regions that most drove the top suggestion, not an outline of the lesion",
    }
