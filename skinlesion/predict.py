"""Diagnostic suggestions for individual images: `skinlesion predict --checkpoint FILE IMAGE...`.

The model is loaded once (`model.load_for_inference`, which refuses checkpoints that would run code
when unpickled) and the images go through it in batches, through the one inference path that
evaluate and serve share (`skinlesion.inference`). One unreadable image does not stop the others:
it gets an error entry and the command exits with status 1.

It says what the page says (`skinlesion.report`): the same model card, risk bands, out-of-distribution
notice, whole percents and banner for a model not trained on real dermoscopy, in text and in ``--json``.

Start-up is most of a short run's time, so this module imports only what prediction needs: torch,
torchvision (for the model and the resize) and PIL, never accelerate, W&B, pandas or scikit-learn
(`bench predict` measures it; docs/benchmarks.md).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from skinlesion import inference
from skinlesion.control_chars import printable
from skinlesion.errors import UserError
from skinlesion.model import LoadedModel, load_for_inference
from skinlesion.report import Calibration

# Images per forward pass. On CPU, batch 8 was 1.13x one-at-a-time while batch 32 was 0.73x (ResNet-50,
# 224 px, 2 cores; docs/benchmarks.md): big CPU batches fall out of cache.
BATCH_SIZE = 8
DISCLAIMER = (
    "Decision support only, not a diagnosis: these are a model's probabilities for the dermoscopic categories "
    "it was trained on. The diagnosis rests with a clinician (and, for suspicious lesions, histopathology)."
)
NO_CALIBRATION = Calibration(None, None, "no model card given")


def load_image(path: Path, transform: Callable[[bytes], torch.Tensor]) -> torch.Tensor:
    """`transform` the bytes of `path` (`inference.file_to_input`: prepare's own checks, orientation and steps).

    Raises ValueError with a message that names the problem (missing, not an image, truncated, bomb, ...).
    """
    from skinlesion.data.images import BadImage

    if not path.exists():
        raise ValueError("file not found")
    if not path.is_file():
        raise ValueError("not a file")
    try:
        return transform(path.read_bytes())
    except BadImage as exc:
        raise ValueError(str(exc)) from None
    except OSError as exc:
        raise ValueError(f"unreadable file ({exc.strerror or exc})") from None


def predict_images(
    loaded: LoadedModel,
    paths: Sequence[Path],
    top_k: int | None = None,
    tta: bool = False,
    batch_size: int = BATCH_SIZE,
    device: torch.device | None = None,
    calibration: Calibration = NO_CALIBRATION,
) -> list[dict[str, Any]]:
    """One entry per path, in order: {image, error} or {image} + `Calibration.judge`'s fields (predictions,
    malignant probability, risk band, OOD verdict and their words). `top_k`: default_top_k's when None."""
    top_k = default_top_k(loaded.classes) if top_k is None else top_k
    _check_top_k(top_k, loaded.classes)
    device = device or next(loaded.model.parameters()).device

    def transform(data: bytes) -> torch.Tensor:
        return inference.file_to_input(data, loaded.image_size, loaded.shard_size, loaded.jpeg_quality)[0]

    entries: list[dict[str, Any]] = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        tensors: list[torch.Tensor] = []
        chunk_entries: list[dict[str, Any]] = []
        for path in chunk:
            try:
                tensors.append(load_image(Path(path), transform))
                chunk_entries.append({"image": str(path)})
            except ValueError as exc:
                chunk_entries.append({"image": str(path), "error": str(exc)})
        if tensors:
            out = inference.run(loaded.model, torch.stack(tensors).to(device), tta=tta)
            ok = iter(zip(out.probs.cpu(), calibration.scores(out), strict=True))
            for entry in chunk_entries:
                if "error" not in entry:
                    entry.update(calibration.judge(*next(ok), top_k))
        entries.extend(chunk_entries)
    return entries


def default_top_k(classes: Sequence[str]) -> int:
    """The top 3, or every class of a model with fewer (ISIC 2020's is binary): serve and predict alike."""
    return min(3, len(classes))


def _check_top_k(top_k: int, classes: Sequence[str]) -> None:
    """--top-k shows from one to all of the model's classes (7 for HAM10000, 8 for ISIC 2019)."""
    if not 1 <= top_k <= len(classes):
        raise UserError(f"--top-k {top_k}: choose a number from 1 to {len(classes)} (this model's classes)")


def document(checkpoint: Path, calibration: Calibration, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """`predict --json`'s document, the shape of the page's "Download results": the model (its checkpoint,
    training-data source and banner), the disclaimer, and the entries."""
    card = calibration.card
    model = {
        "checkpoint": str(checkpoint),
        "card": card is not None,
        "problem": calibration.problem,
        "training_data_source": (card.get("training_data") or {}).get("source") if card else None,
        "banner": calibration.banner,
        "malignant_classes": list(calibration.labels.malignant),
        "malignant_note": calibration.malignant_note,  # `report.NO_MALIGNANT` for a model with no malignant class
    }
    return {"model": model, "disclaimer": DISCLAIMER, "results": entries}


def preprocessing(loaded: LoadedModel) -> dict[str, Any]:
    """How files become the model's input, for --json and the page: the checkpoint's facts, and the fallback's
    note when it lacks the shard ones (null otherwise)."""
    return {
        "image_size": loaded.image_size,
        "shard_size": loaded.shard_size,
        "jpeg_quality": loaded.jpeg_quality,
        "note": inference.fallback_note(loaded.shard_size, loaded.jpeg_quality),
    }


def format_text(
    entries: Sequence[dict[str, Any]], calibration: Calibration = NO_CALIBRATION, preprocessing_note: str | None = None
) -> str:
    """Human-readable report: the banner (or why nothing is calibrated) first, one block per image, the
    disclaimer last. Percents, band words and the notice are those of the page.

    Every name from a file (image paths, class codes and names, error details) is shown with its control
    characters escaped (`control_chars.printable`): a CR or escape sequence in one would rewrite the lines
    around it, a forged "risk band" line included."""
    lines: list[str] = []
    if calibration.banner:
        lines += [f"WARNING: {calibration.banner}", ""]
    if calibration.card is None:
        lines += [f"note: no risk bands and no out-of-distribution check ({calibration.problem})", ""]
    if preprocessing_note:
        lines += [f"note: {preprocessing_note}", ""]
    labels = [f"{p['dx']}: {p['name']}" for e in entries for p in e.get("predictions", [])]
    width = max((len(printable(label)) for label in labels), default=0)
    for entry in entries:
        lines.append(entry["image"])
        if "error" in entry:
            lines.append(f"  error: {entry['error']}")
        else:
            if entry.get("notice"):
                lines.append(f"  NOT RELIABLE: {entry['notice']}")
            for rank, pred in enumerate(entry["predictions"], start=1):
                label = printable(f"{pred['dx']}: {pred['name']}")
                lines.append(f"  {rank}. {label:<{width}}  {pred['percent']:>4}")
            lines += _malignant_lines(entry, calibration)
        lines.append("")
    lines.append(DISCLAIMER)
    return "\n".join(map(printable, lines))  # each line is one line: a newline inside one is a name's, escaped


def _malignant_lines(entry: dict[str, Any], calibration: Calibration) -> list[str]:
    """The malignant probability (over the classes summed) and the risk band; for a model with no malignant
    class, the one line that says so (`report.NO_MALIGNANT`) instead of a "malignant ()" sum over nothing."""
    if entry["malignant_probability"] is None:
        return [f"  {entry['risk_note']}"]
    band = f"{entry['risk_label']}. " if entry.get("risk_label") else ""
    malignant = " + ".join(calibration.labels.malignant)
    return [f"  malignant ({malignant}): {entry['malignant_percent']}", f"  risk band: {band}{entry['risk_note']}"]


def predict_command(
    checkpoint: Path,
    images: Sequence[Path],
    top_k: int | None = None,
    as_json: bool = False,
    tta: bool = False,
    image_size: int | None = None,
) -> int:
    """CLI entry: print suggestions for `images`; 0 when all were predicted, 1 when any failed. `top_k` None:
    the top 3, or all classes of a model with fewer; an explicit one larger than the classes is an error."""
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k {top_k}: choose a number from 1 to the model's number of classes")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    checkpoint = Path(checkpoint)
    loaded = load_for_inference(checkpoint, image_size=image_size)
    top_k = default_top_k(loaded.classes) if top_k is None else top_k
    _check_top_k(top_k, loaded.classes)
    loaded.model.to(device)
    calibration = Calibration.load(checkpoint, loaded)
    entries = predict_images(
        loaded, [Path(p) for p in images], top_k=top_k, tta=tta, device=device, calibration=calibration
    )
    note = inference.fallback_note(loaded.shard_size, loaded.jpeg_quality)  # said once, not per image
    if as_json:
        doc = document(checkpoint, calibration, entries)
        doc["model"]["preprocessing"] = preprocessing(loaded)
        print(json.dumps(doc, indent=2))
    else:
        print(format_text(entries, calibration, note))
    failed = sum("error" in e for e in entries)
    if failed:
        print(f"error: {failed} of {len(entries)} images could not be read (see their entries)", file=sys.stderr)
    return 1 if failed else 0
