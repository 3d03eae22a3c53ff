"""The typed config: recipes load, overrides apply with YAML types, and every mistake names its key."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import REPO

from skinlesion.config import Config, load_config
from skinlesion.errors import UserError


@pytest.mark.parametrize("recipe", ["smoke.yaml", "ham10000.yaml"])
def test_the_shipped_recipes_load(recipe: str) -> None:
    cfg = load_config(REPO / "configs" / recipe)
    assert isinstance(cfg, Config) and cfg.data.batch_size > 0


def test_ham10000_recipe_is_the_real_one() -> None:
    cfg = load_config(REPO / "configs" / "ham10000.yaml")
    assert (cfg.model.name, cfg.model.pretrained, cfg.data.image_size) == ("resnet50", "imagenet", 224)


def test_overrides_are_parsed_as_yaml_scalars() -> None:
    cfg = load_config(
        REPO / "configs" / "smoke.yaml",
        ["train.lr=3e-4", "train.epochs=3", "train.compile=true", "wandb.name=null", "data.shards=/x/y"],
    )
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.compile, cfg.wandb.name) == (3e-4, 3, True, None)
    assert cfg.data.shards == Path("/x/y")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr_rate=1", r"unknown config key 'train.lr_rate' \(did you mean 'train.lr'\?\)"),
        ("trian.lr=1", r"unknown config section 'trian' \(did you mean 'train'\?\)"),
        ("train.epochs=three", r"'train.epochs' must be an integer, got 'three'"),
        ("train.epochs=2.5", r"'train.epochs' must be an integer"),
        ("train.compile=1", r"'train.compile' must be true or false"),
        ("train.optimizer=lamb", r"'train.optimizer' is 'lamb'; choose one of adamw, adam, sgd"),
        ("train.mixed_precision=fp8", r"train.mixed_precision"),
        ("data.batch_size=0", r"'data.batch_size' must be > 0"),
        ("train.lr=-1", r"'train.lr' must be > 0"),
        ("wandb.mode=loud", r"'wandb.mode'"),
        ("train.resume=/no/such/checkpoint", r"train.resume=.*no such checkpoint folder"),
        ("epochs=3", r"section.key=value"),
    ],
)
def test_bad_keys_and_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_config(REPO / "configs" / "smoke.yaml", [override])


def test_unknown_key_in_a_recipe_file_names_the_file(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model:\n  nmae: resnet18\n")
    with pytest.raises(UserError, match=r"bad.yaml: unknown config key 'model.nmae' \(did you mean 'model.name'\?\)"):
        load_config(recipe)


def test_missing_recipe_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "nan", "inf", "1e999"])
@pytest.mark.parametrize("key", ["train.lr", "train.weight_decay", "train.grad_clip", "train.warmup_epochs"])
def test_non_finite_numbers_are_rejected_for_every_float_key(key: str, value: str) -> None:
    with pytest.raises(UserError, match=f"config key '{key}' must be a finite number"):
        load_config(None, [f"{key}={value}"])


def test_a_binary_config_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from skinlesion.cli import main

    binary = tmp_path / "model.pt"
    binary.write_bytes(b"PK\x03\x04\x00\xff\xfe\x80 not yaml at all")
    assert main(["train", "--config", str(binary)]) == 2
    err = capsys.readouterr().err
    assert "is not a text file (not UTF-8)" in err and err.count("\n") == 1


@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_train_output_dir_that_cannot_be_a_folder_is_one_line(tmp_path, capsys, shards_dir, where) -> None:
    from skinlesion.cli import main

    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    out = blocker if where == "file" else blocker / "run"
    code = main(
        [
            "train",
            "--config",
            str(REPO / "configs/smoke.yaml"),
            f"data.shards={shards_dir}",
            f"train.output_dir={out}",
            "wandb.mode=disabled",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"train.output_dir={out}" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("size", [8, 100000])
def test_image_size_outside_what_a_model_may_use_is_refused(size: int) -> None:
    with pytest.raises(UserError, match=f"'data.image_size' must be from 16 to 1024 px, got {size}"):
        load_config(None, [f"data.image_size={size}"])


def test_no_on_the_command_line_is_the_string_no_not_false() -> None:
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["train.mixed_precision=no", "wandb.name=off"])
    assert (cfg.train.mixed_precision, cfg.wandb.name) == ("no", "off")
    assert load_config(None, ["train.compile=true"]).train.compile is True


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "train:\n  epochs: 3\nmodel:\n  name: resnet18\ntrain:\n  lr: 0.1\n",
            "key 'train' appears twice (lines 1 and 5)",
        ),
        ("train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n", "key 'lr' appears twice (lines 2 and 4)"),
    ],
)
def test_a_key_given_twice_in_a_recipe_is_refused_naming_it(tmp_path, capsys, text: str, message: str) -> None:
    """Plain YAML keeps the last of two keys: the first `train:` section (or lr) would be dropped unseen."""
    from skinlesion.cli import main

    recipe = tmp_path / "twice.yaml"
    recipe.write_text(text)
    with pytest.raises(UserError, match=f"^{re.escape(f'{recipe}: {message}; keep one')}$"):
        load_config(recipe)
    assert main(["train", "--config", str(recipe)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_yaml_merge_keys_may_still_be_overridden() -> None:
    import yaml

    from skinlesion.config import _Loader

    text = "base: &b {lr: 0.1, epochs: 2}\nrun:\n  <<: *b\n  lr: 0.2\n"
    assert yaml.load(text, Loader=_Loader)["run"] == {"lr": 0.2, "epochs": 2}


CONTROL = [
    "train.output_dir=runs/a\nmodel.name=resnet50",
    "wandb.name=a\tb",
    "data.shards=x\x00y",
    "wandb.entity=a\u2028b",
]


@pytest.mark.parametrize("override", CONTROL)
def test_control_characters_in_paths_and_names_are_refused(tmp_path: Path, override: str) -> None:
    """YAML folds a newline in train.output_dir into a space; slurm/job.sh and a sweep's argument list split on it."""
    with pytest.raises(UserError, match=f"^override {re.escape(repr(override))} holds a control character"):
        load_config(None, [override])
    key, _, value = override.partition("=")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"{key.split('.')[0]}:\n  {key.split('.')[1]}: {json.dumps(value)}\n")
    with pytest.raises(UserError, match=f"config key '{key}' holds a control character"):
        load_config(recipe)


@pytest.mark.parametrize(
    ("override", "limit"), [("train.seed=4294967296", 2**32 - 1), ("data.batch_size=3000000000", 2**31 - 1)]
)
def test_integers_past_what_torch_and_numpy_take_are_refused(override: str, limit: int) -> None:
    with pytest.raises(UserError, match=f"is out of range: .* \\(at most {limit}\\)"):
        load_config(None, [override])
    assert load_config(None, ["train.seed=4294967295"]).train.seed == 2**32 - 1


def test_decoding_on_the_device_with_cpu_augmentation_is_refused_at_load(tmp_path) -> None:
    """A contradiction in the recipe fails when the config is read, before train creates or locks its folder."""
    with pytest.raises(UserError, match=r"data\.decode=device needs data\.augment=device"):
        load_config(None, ["data.decode=device", "data.augment=cpu", f"train.output_dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run").exists()
