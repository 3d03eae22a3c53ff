"""Pixels -> probabilities, features, heat maps: the one inference path of evaluate, predict and serve.

Preprocessing is `data.transforms.eval_uint8` (resize the shorter side, centre crop, uint8) on the CPU and
`data.augment.to_model_input` (normalise) on the device, whoever the caller is. An image file (predict, serve)
first takes the steps prepare took to make its shard image (`file_to_input`), so predict on a file gives
evaluate's probabilities for its shard (tests/test_preprocess_parity.py), and predict and serve give the same
for the same file (tests/test_serve.py checks it to 1e-6).

The ResNet forward is written out here (`forward`) instead of called as ``model(x)``: one pass then
yields the logits, the penultimate features (what the out-of-distribution distance measures) and, for
Grad-CAM, the activations of the last stages to differentiate. That makes Grad-CAM a few lines on tensors
autograd already holds, with no hooks to register and remove and no extra dependency; it is exact for
torchvision's ResNets, the only architectures skinlesion builds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf
from PIL import Image
from torch import nn

from skinlesion.data.augment import to_model_input
from skinlesion.data.datasets import names_for
from skinlesion.data.images import decode_rgb, process_bytes
from skinlesion.data.transforms import decode, eval_uint8, pil_to_uint8
from skinlesion.labels import CLASSES, MALIGNANT, NAMES

CAM_MIN_SIDE = 4  # Grad-CAM uses the last stage whose map is at least this many positions a side


def preprocess(image: Image.Image, image_size: int) -> torch.Tensor:
    """A decoded, upright RGB image -> the evaluation preset as uint8 [3, S, S] (CPU side)."""
    return eval_uint8(pil_to_uint8(image), image_size)


def file_to_input(
    data: bytes, image_size: int, shard_size: int | None, jpeg_quality: int | None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """An image file's bytes -> (the model's input, uint8 [3, S, S]; the (width, height) it was cropped from).

    With the checkpoint's `shard_size` and `jpeg_quality` (`facts.ModelFacts`), the file takes prepare's
    steps (`images.process_bytes`: orient, convert, resize to the shard size, re-encode as JPEG at that
    quality) and then evaluate's (`transforms.eval_crop`: libjpeg-turbo decode, resize, centre crop): the
    very pixels evaluate gives the model for the file's shard. Resizing straight to `image_size` instead
    (what a checkpoint without those facts still gets) moved malignant probabilities by up to 0.0097 on the
    real sample, and leaving out only the re-encoding 0.0033, with 2 of 150 OOD flags changed either way
    (docs/evaluation.md#one-preprocessing).
    Raises `images.BadImage` for a file prepare would reject.
    """
    if shard_size is None or jpeg_quality is None:
        image = decode_rgb(data)
        return preprocess(image, image_size), image.size
    pixels = decode(process_bytes(data, shard_size, quality=jpeg_quality))
    return eval_uint8(pixels, image_size), (pixels.shape[-1], pixels.shape[-2])


def fallback_note(shard_size: int | None, jpeg_quality: int | None) -> str | None:
    """The one line predict and serve show for a checkpoint that does not record how its shards were made."""
    if shard_size is not None and jpeg_quality is not None:
        return None
    return (
        "this checkpoint does not record its training shards' size and JPEG quality (trained before they were "
        "recorded, or a foreign state_dict): images are resized straight to the model's input, so probabilities "
        "can differ from evaluate's on shards (docs/evaluation.md#one-preprocessing)"
    )


def crop_box(width: int, height: int) -> dict[str, float]:
    """The square `preprocess` keeps of a width x height image, as fractions of its width and height
    ({x, y, w, h}): the centred square whose side is the shorter side (the resize keeps the aspect ratio).
    The page outlines it on the user's own, full-resolution image and lays the heat map inside it; the
    fractions of the shard-sized image `file_to_input` crops are those of the original up to its rounding."""
    side = min(width, height)
    return {"x": (width - side) / 2 / width, "y": (height - side) / 2 / height, "w": side / width, "h": side / height}


def forward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """torchvision ResNet forward on normalised input: (logits, penultimate features, (layer3, layer4) activations)."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    stage3 = model.layer3(model.layer2(model.layer1(x)))
    stage4 = model.layer4(stage3)
    features = torch.flatten(model.avgpool(stage4), 1)
    return model.fc(features), features, (stage3, stage4)


def dihedral_views(images: torch.Tensor) -> Iterator[torch.Tensor]:
    """The 8 symmetries of a square [B, C, H, W] batch: 4 rotations by 90 degrees, each with and without a flip.

    Dermoscopy has no canonical orientation, so all 8 views are equally valid inputs; vertical flips
    are rotations of the horizontal flip and need no separate view.
    """
    for flipped in (images, images.flip(-1)):
        for k in range(4):
            yield torch.rot90(flipped, k, dims=(-2, -1))


@torch.inference_mode()
def class_probabilities(model: nn.Module, images: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Softmax probabilities [B, 7] in float32 of normalised `images`; with `tta`, the mean over 8 views."""
    if not tta:
        return model(images).float().softmax(dim=1)
    # One view at a time: peak memory stays that of a plain batch.
    total = sum(model(view).float().softmax(dim=1) for view in dihedral_views(images))
    return total / 8


def centre_contrast(x: torch.Tensor) -> torch.Tensor:
    """[B] distance between the mean colour of the central half of normalised images [B, 3, S, S] and that of
    the rest (the outer ring), in units of the normalisation's per-channel standard deviation.

    Dermoscopic images are centred on the lesion (HAM10000's are), and a lesion differs in colour from the
    skin around it. Plain skin, a flat colour, noise and linear gradients (uneven lighting) give about 0:
    a symmetric ring cancels a linear ramp. The out-of-distribution check uses it (`skinlesion.card`).
    """
    side_h, side_w = x.shape[-2:]
    mask = torch.zeros(side_h, side_w, dtype=torch.bool, device=x.device)
    mask[round(side_h / 4) : side_h - round(side_h / 4), round(side_w / 4) : side_w - round(side_w / 4)] = True
    flat = x.float().flatten(2)  # [B, 3, S*S]
    centre, ring = flat[..., mask.flatten()].mean(-1), flat[..., ~mask.flatten()].mean(-1)
    return (centre - ring).norm(dim=1)


@dataclass(frozen=True)
class Outputs:
    """What one forward pass gives for a batch: probabilities [B, 7], penultimate features [B, D] and the
    centre-to-ring colour contrast of the model's input [B] (`centre_contrast`)."""

    probs: torch.Tensor
    features: torch.Tensor
    contrast: torch.Tensor


@torch.inference_mode()
def run(model: nn.Module, images_uint8: torch.Tensor, tta: bool = False) -> Outputs:
    """uint8 [B, 3, S, S] on the model's device -> probabilities (TTA optional), and the features and contrast
    of the un-augmented view."""
    x = to_model_input(images_uint8)
    views = list(dihedral_views(x)) if tta else [x]  # the first view is the image itself
    probs = torch.zeros(())  # broadcasts to [B, classes]: the head, not a constant, says how many
    for i, view in enumerate(views):
        logits, view_features, _ = forward(model, view)
        probs = probs.to(logits.device) + logits.float().softmax(dim=1)
        if i == 0:
            features = view_features.float()
    return Outputs(probs=probs / len(views), features=features, contrast=centre_contrast(x))


def grad_cam(
    model: nn.Module, images_uint8: torch.Tensor, target: torch.Tensor | None = None
) -> tuple[torch.Tensor, Outputs]:
    """Grad-CAM maps [B, S, S] in [0, 1] for `target` classes (default: the top class), and the `Outputs` of
    the same forward pass (so a caller that wants both pays for one pass: the backward only reaches a stage's
    activations, not the weights, and costs little).

    The gradient of the class score with respect to a stage's activations, averaged over space, weighs its
    channels; the weighted sum, rectified, upsampled and scaled to a maximum of 1, is the map (Selvaraju
    et al. 2017). The stage is the last one (layer4) whenever its map has at least 4 x 4 positions, i.e. from
    128-px inputs up (7 x 7 at 224 px). At smaller inputs layer4 is 2 x 2 or 3 x 3 and its map is a blur
    over the image centre: on the 64-px demo model it put 22% of its mass on lesions covering 21% of the
    crop, no better than a uniform map, while layer3 (4 x 4) put 43% there (docs/serve.md).
    """
    x = to_model_input(images_uint8)
    with torch.enable_grad():
        logits, features, (stage3, stage4) = forward(model, x)
        activations = stage4 if min(stage4.shape[-2:]) >= CAM_MIN_SIDE else stage3
        if target is None:
            target = logits.argmax(dim=1)
        score = logits.gather(1, target.view(-1, 1)).sum()
        (grads,) = torch.autograd.grad(score, activations)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activations).sum(dim=1, keepdim=True)).detach()
    cam = nnf.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(dim=1).values.clamp(min=1e-12).view(-1, 1, 1)
    outputs = Outputs(
        probs=logits.detach().float().softmax(dim=1), features=features.detach().float(), contrast=centre_contrast(x)
    )
    return (cam / peak).float(), outputs


@dataclass(frozen=True)
class Labels:
    """A model's classes (head order), their full names and the malignant ones: what predictions are named with.

    They come from the checkpoint's facts (and the model card's names for a custom dataset), never from a global.
    """

    classes: tuple[str, ...]
    names: dict[str, str]
    malignant: tuple[str, ...]

    @classmethod
    def of(cls, classes: tuple[str, ...], malignant: tuple[str, ...], card: dict | None = None) -> Labels:
        names = names_for(classes)
        for entry in (card or {}).get("classes") or []:
            if isinstance(entry, dict) and entry.get("dx") in classes and isinstance(entry.get("name"), str):
                names.setdefault(entry["dx"], entry["name"])
        return cls(tuple(classes), {c: names.get(c, c) for c in classes}, tuple(malignant))


HAM10000_LABELS = Labels(CLASSES, dict(NAMES), MALIGNANT)


def describe(probs: torch.Tensor, top_k: int, labels: Labels = HAM10000_LABELS) -> dict:
    """Top-k diagnoses with full names, and the malignant probability (the sum over the malignant classes:
    mel + bcc + akiec for HAM10000). None for a model with no malignant class: an empty sum would read as a
    reassuring "<1%" beside, say, "melanoma 96%" of a custom dataset whose spec marked nothing malignant."""
    values, indices = probs.topk(top_k)
    malignant = [labels.classes.index(dx) for dx in labels.malignant]
    return {
        "predictions": [
            {"dx": labels.classes[i], "name": labels.names[labels.classes[i]], "probability": float(p)}
            for p, i in zip(values.tolist(), indices.tolist(), strict=True)
        ],
        "malignant_probability": float(probs[malignant].sum()) if malignant else None,
        "malignant_classes": list(labels.malignant),  # the classes summed: the model's, not a constant
    }
