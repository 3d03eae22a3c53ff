"""Dataset descriptions: the ISIC 2019 / 2020 layouts and custom specs, prepared from synth's files in exactly
the published layouts, through to manifest.json, the split, the metrics and the checkpoint's head."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from skinlesion.data import datasets
from skinlesion.data.manifest import verify_split
from skinlesion.data.prepare import PrepareOptions, prepare
from skinlesion.data.synthetic_isic import (
    DUPLICATES_2020,
    GT_2019,
    GT_2020,
    HEADER_2019,
    HEADER_2020,
    IMAGES_2019,
    IMAGES_2020,
    META_2019,
    META_HEADER_2019,
    generate_isic,
)
from skinlesion.errors import UserError
from skinlesion.labels import CLASSES


@pytest.fixture(scope="session")
def isic2019_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("isic2019")
    generate_isic(out, "isic2019", n_images=240, seed=0, workers=1)
    return out


@pytest.fixture(scope="session")
def isic2020_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("isic2020")
    generate_isic(out, "isic2020", n_images=300, seed=0, workers=1)
    return out


def _opts2019(src: Path, out: Path, **kw: object) -> PrepareOptions:
    base = dict(
        metadata=src / META_2019,
        labels=src / GT_2019,
        images=(src / IMAGES_2019,),
        out=out,
        dataset="isic2019",
        image_size=32,
        min_shards=2,
        workers=1,
    )
    return PrepareOptions(**{**base, **kw})


def _samples(out: Path) -> list[tuple[str, int, dict]]:
    """(split, class index, json) of every sample in the shards."""
    manifest = json.loads((out / "manifest.json").read_text())
    rows = []
    for split, info in manifest["splits"].items():
        for name in info["files"]:
            with tarfile.open(out / name) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            for key in {n.split(".", 1)[0] for n in members}:
                rows.append((split, int(members[f"{key}.cls"]), json.loads(members[f"{key}.json"])))
    return rows


def test_synth_writes_the_published_headers(isic2019_dir: Path, isic2020_dir: Path) -> None:
    assert (isic2019_dir / GT_2019).read_text().splitlines()[0] == ",".join(HEADER_2019)
    assert (isic2019_dir / META_2019).read_text().splitlines()[0] == ",".join(META_HEADER_2019)
    assert (isic2020_dir / GT_2020).read_text().splitlines()[0] == ",".join(HEADER_2020)
    assert (isic2020_dir / DUPLICATES_2020).read_text().splitlines()[0] == "image_name_1,image_name_2"
    truth = pd.read_csv(isic2019_dir / GT_2019)
    assert (truth["UNK"] == 0).all() and (truth.iloc[:, 1:].sum(axis=1) == 1).all()
    meta = pd.read_csv(isic2019_dir / META_2019, dtype=str, keep_default_na=False)
    old = meta[meta["lesion_id"] == ""]
    assert len(old) > 0 and set(truth.set_index("image").loc[old["image"]].idxmax(axis=1)) <= {"NV", "MEL", "BKL"}
    downsampled = meta["image"][meta["image"].str.endswith("_downsampled")]
    assert len(downsampled) > 0 and all((isic2019_dir / IMAGES_2019 / f"{i}.jpg").is_file() for i in downsampled)


def test_isic2019_prepares_eight_classes_with_old_archive_rows_as_their_own_groups(
    isic2019_dir: Path, tmp_path: Path
) -> None:
    result = prepare(_opts2019(isic2019_dir, tmp_path / "out"))
    manifest = result.manifest
    assert manifest["classes"] == ["ak", "bcc", "bkl", "df", "mel", "nv", "scc", "vasc"]
    assert manifest["dataset"]["name"] == "isic2019" and manifest["dataset"]["untrainable"] == ["unk"]
    meta = pd.read_csv(isic2019_dir / META_2019, dtype=str, keep_default_na=False)
    own = int((meta["lesion_id"] == "").sum())
    assert manifest["groups"] == {"key": "lesion_id", "own_groups": own, "ungrouped": False}
    assert (
        f"{own} kept rows have an empty lesion_id: each is its own group"
        in (tmp_path / "out" / "summary.txt").read_text()
    )
    assert manifest["rows"] == {"input": 240, "kept": 240, "rejected": 0}  # blank ages and sites are kept
    samples = _samples(tmp_path / "out")
    truth = pd.read_csv(isic2019_dir / GT_2019).set_index("image")
    for _, label, sample in samples:
        assert truth.loc[sample["image_id"]].idxmax().lower() == manifest["classes"][label]
    splits_of: dict[str, set[str]] = {}
    for split, _, sample in samples:
        splits_of.setdefault(sample["lesion_id"], set()).add(split)
    assert all(len(s) == 1 for s in splits_of.values())  # no lesion on both sides of the split
    assert any(s["image_id"].endswith("_downsampled") for _, _, s in samples)
    for split in manifest["splits"]:  # every sample's json dx is classes[cls]: what train checks before it starts
        verify_split(tmp_path / "out", manifest, split)


def test_isic2019_ground_truth_written_as_ints_with_crlf_reads_the_same(isic2019_dir: Path, tmp_path: Path) -> None:
    truth = pd.read_csv(isic2019_dir / GT_2019)
    ints = tmp_path / "gt.csv"
    ints.write_bytes(
        truth.astype({c: int for c in HEADER_2019[1:]}).to_csv(index=False, lineterminator="\r\n").encode()
    )
    data = ints.read_bytes()
    assert b"\r\n" in data and b"1.0" not in data and b"0.0" not in data
    a = prepare(_opts2019(isic2019_dir, tmp_path / "a")).manifest
    b = prepare(_opts2019(isic2019_dir, tmp_path / "b", labels=ints)).manifest
    assert a["splits"] == b["splits"]


def test_isic2019_rows_that_cannot_be_labelled_are_rejected_by_reason(isic2019_dir: Path, tmp_path: Path) -> None:
    truth = pd.read_csv(isic2019_dir / GT_2019)
    truth.loc[0, ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]] = [0, 0, 0, 0, 0, 0, 0, 0, 1]
    truth.loc[1, ["MEL", "NV"]] = [1.0, 1.0]
    truth = truth.drop(index=2)  # a metadata row without ground truth
    path = tmp_path / "gt.csv"
    truth.to_csv(path, index=False)
    manifest = prepare(_opts2019(isic2019_dir, tmp_path / "out", labels=path)).manifest
    assert manifest["rows"] == {"input": 240, "kept": 237, "rejected": 3}
    reasons = manifest["rejected_by_reason"]
    assert reasons == {
        "untrainable class UNK (it has no training images; the OOD notice covers it)": 1,
        "one-hot label is not a single 1": 1,
        "no row in the --labels file": 1,
    }


def test_isic2019_needs_its_ground_truth_and_says_which_columns_are_missing(isic2019_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"--dataset isic2019 needs --labels ISIC_2019_Training_GroundTruth\.csv"):
        prepare(_opts2019(isic2019_dir, tmp_path / "a", labels=None))
    with pytest.raises(UserError, match=r"gt.csv lacks the column\(s\) UNK .*the isic2019 layout needs image,"):
        bad = tmp_path / "gt.csv"
        pd.read_csv(isic2019_dir / GT_2019).drop(columns="UNK").to_csv(bad, index=False)
        prepare(_opts2019(isic2019_dir, tmp_path / "b", labels=bad))


def test_isic2020_groups_by_patient_spreads_melanoma_and_applies_the_duplicates_list(
    isic2020_dir: Path, tmp_path: Path
) -> None:
    opts = PrepareOptions(
        metadata=isic2020_dir / GT_2020,
        images=(isic2020_dir / IMAGES_2020,),
        out=tmp_path / "out",
        dataset="isic2020",
        duplicates=isic2020_dir / DUPLICATES_2020,
        image_size=32,
        min_shards=2,
        workers=1,
    )
    manifest = prepare(opts).manifest
    pairs = pd.read_csv(isic2020_dir / DUPLICATES_2020)
    assert manifest["classes"] == ["other", "mel"] and manifest["groups"]["key"] == "patient_id"
    assert manifest["duplicates_listed"] == len(pairs) > 0
    assert manifest["rejected_by_reason"] == {"listed in the duplicates file": len(pairs)}
    samples = _samples(tmp_path / "out")
    kept = {s["image_id"] for _, _, s in samples}
    assert not kept & set(pairs["image_name_2"]) and set(pairs["image_name_1"]) <= kept
    patients: dict[str, set[str]] = {}
    for split, _, s in samples:
        patients.setdefault(s["lesion_id"], set()).add(split)  # lesion_id holds the grouping key: the patient
    assert all(len(s) == 1 for s in patients.values())
    mel = {split: info["class_counts"]["mel"] for split, info in manifest["splits"].items()}
    assert all(n > 0 for n in mel.values())  # every split gets melanomas (stratified by patient)
    truth = pd.read_csv(isic2020_dir / GT_2020).set_index("image_name")
    assert all(truth.loc[s["image_id"], "target"] == label for _, label, s in samples)
    for split in manifest["splits"]:
        verify_split(tmp_path / "out", manifest, split)
    # `diagnosis` is the label, not how it was confirmed: no dx_type, so no "confirmed by melanoma" subgroup.
    assert not any("dx_type" in s for _, _, s in samples) and datasets.preset("isic2020").columns.dx_type is None


def _clinic(tmp_path: Path, synthetic_dir: Path, missing_group: str = "reject") -> tuple[Path, dict]:
    """A clinic's labels.csv (file, diagnosis, patient), its photos, and a spec grouping by `patient`."""
    rows = pd.read_csv(synthetic_dir / "HAM10000_metadata.csv", dtype=str, keep_default_na=False).head(80)
    clinic = pd.DataFrame(
        {
            "file": rows["image_id"],
            "diagnosis": rows["dx"].map(lambda d: "Melanoma" if d == "mel" else "Other"),
            "patient": rows["lesion_id"],
        }
    )
    clinic.to_csv(tmp_path / "labels.csv", index=False)
    photos = tmp_path / "photos"
    photos.mkdir()
    for image_id in rows["image_id"]:
        (photos / f"{image_id}.jpg").write_bytes(next(synthetic_dir.glob(f"*/{image_id}.jpg")).read_bytes())
    spec = tmp_path / "my-clinic.yaml"
    spec.write_text(
        "name: my-clinic\n"
        "columns: {image_id: file, label: diagnosis, group: patient}\n"
        "classes:\n  - {code: other, name: other lesion}\n  - {code: mel, name: melanoma, malignant: true}\n"
        "label_map: {Melanoma: mel, Other: other}\n"
        f"cleaning: {{missing_group: {missing_group}}}\n"
        "stratify: rarest\n"
    )
    return spec, dict(metadata=tmp_path / "labels.csv", images=(photos,), image_size=32, min_shards=1, workers=1)


def test_custom_dataset_from_a_yaml_spec_and_from_columns(tmp_path: Path, synthetic_dir: Path) -> None:
    spec, base = _clinic(tmp_path, synthetic_dir)
    manifest = prepare(PrepareOptions(**base, out=tmp_path / "a", dataset="custom", spec=spec)).manifest
    assert manifest["classes"] == ["other", "mel"] and manifest["dataset"]["name"] == "my-clinic"
    assert manifest["rows"]["kept"] == 80 and manifest["groups"]["key"] == "patient"
    assert datasets.of_manifest(manifest).malignant == ("mel",)
    columns = (("image_id", "file"), ("label", "diagnosis"), ("group", "patient"))
    by_flags = PrepareOptions(**base, out=tmp_path / "b", dataset="custom", columns=columns, malignant=("melanoma",))
    manifest = prepare(by_flags).manifest
    assert manifest["classes"] == ["melanoma", "other"]  # the labels found, sorted
    assert manifest["groups"] == {"key": "patient", "own_groups": 0, "ungrouped": False}
    assert manifest["rows"]["kept"] == 80
    assert datasets.of_manifest(manifest).malignant == ("melanoma",)
    spec.write_text("columns: {image_id: file}\nclasses: [a, b]\n")
    with pytest.raises(UserError, match=r"^--spec .*my-clinic.yaml: columns must name exactly one of label"):
        prepare(PrepareOptions(**base, out=tmp_path / "c", dataset="custom", spec=spec))


def test_ham10000_stays_the_default_and_its_description_is_the_old_constants(shards_dir: Path) -> None:
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    assert manifest["dataset"]["name"] == "ham10000" and manifest["classes"] == list(CLASSES)
    ham = datasets.of_manifest(manifest)
    assert ham.codes == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    assert ham.malignant == ("akiec", "bcc", "mel")
    assert [c for c, _ in ham.submission] == ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    assert "ISIC 2019 splits it into AK and SCC" in ham.classes[0].note
    legacy = {k: v for k, v in manifest.items() if k != "dataset"}  # a manifest from before descriptions
    assert datasets.of_manifest(legacy) == ham


def test_partial_auc_and_2019_balanced_accuracy_agree_with_the_official_scorer(monkeypatch, tmp_path: Path) -> None:
    """On the predictions.csv evaluate writes, OOD scores and all (they go to ood.csv: issue 21, point 16)."""
    pytest.importorskip("isic_challenge_scoring")
    from isic_challenge_scoring.classification import ClassificationMetric, ClassificationScore
    from isic_challenge_scoring.metrics import auc_above_sensitivity

    from skinlesion.eval_outputs import write_outputs
    from skinlesion.evaluate import Predictions
    from skinlesion.metrics import compute_metrics, partial_auc_above_sensitivity

    if not hasattr(pd.DataFrame, "applymap"):
        monkeypatch.setattr(pd.DataFrame, "applymap", pd.DataFrame.map, raising=False)
    rng = np.random.default_rng(3)
    positive = rng.uniform(size=300) < 0.1
    scores = rng.normal(size=300) + 1.2 * positive
    theirs = auc_above_sensitivity(pd.Series(positive.astype(float)), pd.Series(scores), pd.Series(np.ones(300)), 0.8)
    assert partial_auc_above_sensitivity(positive, scores, 0.8) == pytest.approx(theirs, abs=1e-12)

    # ISIC 2019: 8 columns plus UNK. The scorer needs UNK images in the truth (it has no AUC for a category
    # without positives), as the 2019 test set has; our CSV writes UNK as 0, so it never predicts UNK, and the
    # scorer's balanced accuracy is our 8 recalls and UNK's 0 over 9 categories.
    isic2019 = datasets.preset("isic2019")
    n, k, n_unk = 120, 8, 6
    y_true = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])
    logits = rng.normal(size=(n + n_unk, k)) + 2.0 * np.eye(k)[np.concatenate([y_true, np.zeros(n_unk, int)])]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ids = [f"ISIC_{i:07d}" for i in range(n + n_unk)]
    labels = np.concatenate([y_true, np.zeros(n_unk, int)])
    ood = np.linspace(0.0, 2.0, n + n_unk)
    preds = Predictions(ids, ids, [None] * len(ids), labels, probs, ood_scores=ood, classes=isic2019.codes)
    metrics = compute_metrics(labels, probs, n_bootstrap=0, classes=isic2019.codes)
    files = write_outputs(tmp_path / "eval", preds, metrics, plots=False, dataset=isic2019)
    predictions = files["predictions"].read_text()
    assert predictions.splitlines()[0] == "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK"
    assert files["ood"].read_text().splitlines()[0] == "image,ood_score,ood_flag"
    one_hot = np.zeros((n + n_unk, k + 1))
    one_hot[np.arange(n), y_true] = 1
    one_hot[n:, k] = 1
    truth = pd.DataFrame(one_hot, columns=[*(c.upper() for c in isic2019.codes), "UNK"])
    truth.insert(0, "image", ids)
    truth_csv = truth[["image", *HEADER_2019[1:]]].to_csv(index=False)
    score = ClassificationScore.from_stream(
        io.StringIO(truth_csv), io.StringIO(predictions), ClassificationMetric.BALANCED_ACCURACY
    )
    ours = compute_metrics(y_true, probs[:n], n_bootstrap=0, classes=isic2019.codes)
    assert ours["balanced_accuracy"] * k / (k + 1) == pytest.approx(score.aggregate["balanced_accuracy"], abs=1e-12)
    mel = isic2019.codes.index("mel")
    is_mel = np.concatenate([y_true == mel, np.zeros(n_unk, bool)])
    assert partial_auc_above_sensitivity(is_mel, probs[:, mel], 0.8) == pytest.approx(
        score.per_category.loc["MEL", "auc_sens_80"], abs=1e-12
    )


def test_isic2020_predictions_are_the_challenge_sample_submission_layout(tmp_path: Path) -> None:
    """ISIC 2020 was scored on Kaggle, not by isic-challenge-scoring (whose reader needs an `image` column), so
    this checks the layout of the challenge's published sample submission: exactly `image_name,target`, one
    row per image, the melanoma probability as a number in [0, 1]; the OOD scores go to ood.csv."""
    from skinlesion.eval_outputs import write_outputs
    from skinlesion.evaluate import Predictions
    from skinlesion.metrics import compute_metrics

    isic2020 = datasets.preset("isic2020")
    ids = ["ISIC_0052060", "ISIC_0052349", "ISIC_0058510", "ISIC_0073313"]
    labels = np.array([0, 1, 0, 1])
    probs = np.array([[0.75, 0.25], [0.125, 0.875], [1.0, 0.0], [0.5, 0.5]])
    preds = Predictions(
        ids, ids, ids, labels, probs, ood_scores=np.array([0.5, 2.0, 0.1, 1.5]), classes=("other", "mel")
    )
    metrics = compute_metrics(labels, probs, n_bootstrap=0, classes=isic2020.codes)
    files = write_outputs(tmp_path / "eval", preds, metrics, plots=False, dataset=isic2020)
    assert files["predictions"].read_text().splitlines() == [
        "image_name,target",
        "ISIC_0052060,0.25",
        "ISIC_0052349,0.875",
        "ISIC_0058510,0.0",
        "ISIC_0073313,0.5",
    ]
    assert files["ood"].read_text().splitlines()[1:] == [
        f"{i},{s},{f}" for i, s, f in zip(ids, (0.5, 2.0, 0.1, 1.5), (0, 1, 0, 1), strict=True)
    ]


def test_binary_metrics_bootstrap_auc_over_patients() -> None:
    from skinlesion.metrics import compute_metrics

    rng = np.random.default_rng(0)
    y = (rng.uniform(size=200) < 0.2).astype(int)
    probs1 = np.clip(0.3 * y + rng.uniform(size=200) * 0.7, 0, 1)
    probs = np.stack([1 - probs1, probs1], axis=1)
    patients = np.repeat(np.arange(20), 10)
    m = compute_metrics(y, probs, groups=patients, n_bootstrap=200, classes=("other", "mel"))
    b = m["binary"]
    assert b["positive"] == "mel" and b["positives"] == int(y.sum()) and b["negatives"] == 200 - int(y.sum())
    assert b["auc"] == pytest.approx(m["per_class"]["mel"]["auc"]) and b["auc_ci95"][0] < b["auc"] < b["auc_ci95"][1]
    assert 0 < b["partial_auc_above_sensitivity_0.8"] <= 1 and b["sensitivity_at_specificity_0.9"] is not None
    assert "binary" not in compute_metrics(y, np.eye(7)[y], n_bootstrap=0)  # seven classes: no binary block


def test_a_ham10000_checkpoint_initialises_an_isic2019_head_where_the_classes_match(
    random_run: Path, tmp_path: Path
) -> None:
    from skinlesion.model import build_model

    isic2019 = datasets.preset("isic2019")
    source = torch.load(random_run / "best.pt", weights_only=True)["model"]
    model = build_model("resnet18", str(random_run / "best.pt"), len(isic2019.codes), isic2019.codes)
    assert model.fc.weight.shape[0] == 8
    for i, dx in enumerate(isic2019.codes):
        if dx in CLASSES:
            assert torch.equal(model.fc.weight[i], source["fc.weight"][CLASSES.index(dx)])
        else:  # ak and scc: a new row (HAM10000's akiec is both)
            assert not any(torch.equal(model.fc.weight[i], row) for row in source["fc.weight"])
    assert torch.equal(model.conv1.weight, source["conv1.weight"])


def test_isic2019_plus_ham10000_is_deduplicated_by_image_id(isic2019_dir: Path, tmp_path: Path) -> None:
    meta = pd.read_csv(isic2019_dir / META_2019, dtype=str, keep_default_na=False)
    inside = meta["image"].head(10).tolist()  # HAM10000 images that ISIC 2019 holds too
    new = [f"ISIC_80000{i:02d}" for i in range(10)]  # and some it does not
    ham_images = tmp_path / "ham"
    ham_images.mkdir()
    for old, name in zip(meta["image"].tail(10), new, strict=True):
        (ham_images / f"{name}.jpg").write_bytes((isic2019_dir / IMAGES_2019 / f"{old}.jpg").read_bytes())
    dx = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc", "nv", "nv", "akiec"]
    ham = pd.DataFrame(
        {
            "lesion_id": [f"HAM_{i:07d}" for i in range(20)],
            "image_id": inside + new,
            "dx": dx + dx,
            "dx_type": "histo",
            "age": "50",
            "sex": "male",
            "localization": "back",
            "dataset": "rosendahl",
        }
    )
    ham.to_csv(tmp_path / "HAM10000_metadata.csv", index=False)
    opts = _opts2019(isic2019_dir, tmp_path / "out", images=(isic2019_dir / IMAGES_2019, ham_images))
    result = prepare(replace(opts, add_ham10000=tmp_path / "HAM10000_metadata.csv"))
    manifest = result.manifest
    assert manifest["added_ham10000"] == {"rows": 20, "already_in_isic2019": 10}
    assert manifest["rows"] == {"input": 260, "kept": 250, "rejected": 10}
    assert manifest["rejected_by_reason"] == {"HAM10000 image already in the ISIC 2019 files (same image_id)": 10}
    labels = {s["image_id"]: manifest["classes"][c] for _, c, s in _samples(tmp_path / "out")}
    assert [labels[i] for i in new] == ["ak", "bcc", "bkl", "df", "mel", "nv", "vasc", "nv", "nv", "ak"]
    with pytest.raises(UserError, match="--add-ham10000 combines HAM10000 with ISIC 2019"):
        prepare(replace(opts, dataset="isic2020", labels=None, add_ham10000=tmp_path / "HAM10000_metadata.csv"))


def test_an_isic_csv_prepared_as_ham10000_points_at_its_dataset(isic2020_dir: Path, tmp_path: Path) -> None:
    opts = PrepareOptions(metadata=isic2020_dir / GT_2020, images=(isic2020_dir / IMAGES_2020,), out=tmp_path / "o")
    with pytest.raises(UserError, match=r"this is ISIC 2020's layout: pass --dataset isic2020\)$"):
        prepare(opts)


@pytest.mark.parametrize("missing_group", ["reject", "own"])
def test_a_named_group_column_absent_from_the_csv_is_an_error(
    tmp_path: Path, synthetic_dir: Path, missing_group: str
) -> None:
    spec, base = _clinic(tmp_path, synthetic_dir, missing_group)
    labels = pd.read_csv(tmp_path / "labels.csv", dtype=str)
    labels.drop(columns="patient").to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(UserError) as caught:
        prepare(PrepareOptions(**base, out=tmp_path / "a", dataset="custom", spec=spec))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"metadata CSV {tmp_path / 'labels.csv'} has no group column")
    assert "'patient'" in message and "(it has: file, diagnosis)" in message and "--allow-ungrouped" in message
    assert not (tmp_path / "a").exists()

    # Said explicitly, each image is its own group, and the manifest and summary say the split is ungrouped.
    result = prepare(PrepareOptions(**base, out=tmp_path / "b", dataset="custom", spec=spec, allow_ungrouped=True))
    manifest = result.manifest
    assert manifest["groups"] == {"key": "image_id", "own_groups": 80, "ungrouped": True}
    assert manifest["dataset"]["columns"]["group"] is None  # the description says what the split really used
    assert datasets.of_manifest(manifest).group_column == "image_id"
    summary = (tmp_path / "b" / "summary.txt").read_text()
    assert "split without grouping" in summary and "may appear in train and test" in summary


def test_allow_ungrouped_is_refused_where_there_is_a_group_column(tmp_path: Path, synthetic_dir: Path) -> None:
    spec, base = _clinic(tmp_path, synthetic_dir)
    with pytest.raises(UserError, match=r"--allow-ungrouped: .*labels\.csv has the group column 'patient'"):
        prepare(PrepareOptions(**base, out=tmp_path / "a", dataset="custom", spec=spec, allow_ungrouped=True))


def test_a_custom_dataset_without_a_group_column_needs_allow_ungrouped(tmp_path: Path, synthetic_dir: Path) -> None:
    _, base = _clinic(tmp_path, synthetic_dir)
    columns = (("image_id", "file"), ("label", "diagnosis"))
    opts = PrepareOptions(**base, out=tmp_path / "a", dataset="custom", columns=columns, malignant=("melanoma",))
    with pytest.raises(UserError, match=r"names no group column.*--column group=NAME.*--allow-ungrouped"):
        prepare(opts)
    manifest = prepare(replace(opts, allow_ungrouped=True)).manifest
    assert manifest["groups"] == {"key": "image_id", "own_groups": 80, "ungrouped": True}


def test_isic2019_metadata_without_a_lesion_id_column_is_an_error(
    isic2019_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from skinlesion.cli import main

    meta = tmp_path / "meta.csv"
    pd.read_csv(isic2019_dir / META_2019, dtype=str, keep_default_na=False).drop(columns="lesion_id").to_csv(
        meta, index=False
    )
    args = [
        "prepare",
        "--dataset",
        "isic2019",
        "--metadata",
        str(meta),
        "--labels",
        str(isic2019_dir / GT_2019),
        "--images",
        str(isic2019_dir / IMAGES_2019),
        "--image-size",
        "32",
        "--min-shards",
        "1",
        "--workers",
        "1",
    ]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"metadata CSV {meta} has no group column 'lesion_id'" in err
    assert "(it has: image, age_approx, anatom_site_general, sex)" in err
    assert main([*args, "--out", str(tmp_path / "b"), "--allow-ungrouped"]) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["groups"] == {"key": "image_id", "own_groups": 240, "ungrouped": True}
    assert manifest["args"]["allow_ungrouped"] is True


def test_the_prepare_summary_counts_groups_in_the_datasets_unit() -> None:
    """ISIC 2020 splits patients: its summary's column said "lesions"."""
    from skinlesion.data.prepare import format_summary

    def summary(key: str) -> str:
        split = {"class_counts": {"other": 5, "mel": 1}, "samples": 6, "images": 6, "lesions": 3, "shards": 1}
        manifest = {"classes": ["other", "mel"], "groups": {"key": key}, "splits": {"train": split}}
        manifest |= {"rows": {"input": 6, "kept": 6, "rejected": 0}, "rejected_by_reason": {}}
        return format_summary(manifest)

    assert " patients " in summary("patient_id") and "lesions" not in summary("patient_id")
    assert "lesions" in summary("lesion_id") and "groups" in summary("image_id")


def test_the_shipped_melanoma_nevus_spec_prepares_melanoma_first_and_marks_it_malignant(
    tmp_path: Path, synthetic_dir: Path
) -> None:
    """configs/datasets/melanoma-nevus.yaml, the custom spec docs/walkthrough.md runs, on synth's HAM10000 files."""
    spec = Path(__file__).parents[1] / "configs" / "datasets" / "melanoma-nevus.yaml"
    opts = PrepareOptions(
        metadata=synthetic_dir / "HAM10000_metadata.csv",
        images=tuple(sorted(synthetic_dir.glob("HAM10000_images_part_*"))),
        out=tmp_path / "out",
        dataset="custom",
        spec=spec,
        image_size=32,
        min_shards=1,
        workers=1,
    )
    manifest = prepare(opts).manifest
    described = datasets.of_manifest(manifest)
    assert described.codes == ("mel", "nv") and described.malignant == ("mel",)
    assert manifest["groups"]["key"] == "lesion_id" and not manifest["groups"].get("ungrouped")
    assert manifest["rejected_by_reason"]["dx not one of the 2 classes"] > 0  # akiec, bcc... are not this question
