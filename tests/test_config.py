from pathlib import Path

import pytest

from edgedistill.recipe import load_config
from edgedistill.errors import UserError

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.parent.name + "/" + p.name)
def test_every_shipped_recipe_validates(recipe):
    cfg = load_config(recipe)
    assert cfg.method.name
    assert cfg.student.arch


def test_the_fidelity_table_recipes_agree_on_what_compare_shares():
    """docs/results.md reproduces its table with one `compare` over recipes/fidelity/: they must agree."""
    from edgedistill.compare import check_agreement

    fidelity = [p for p in RECIPES if p.parent.name == "fidelity"]
    assert {p.stem for p in fidelity} == {"mocov2", "simclr", "seed", "dogo", "disco"}
    check_agreement([(str(p), load_config(p)) for p in fidelity])


def test_recipe_typo_names_the_key_and_the_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: {name: disco}\ntrain:\n  epoch: 3\n")
    with pytest.raises(UserError) as e:
        load_config(recipe)
    msg = str(e.value)
    assert str(recipe) in msg and "train.epoch" in msg and "epochs" in msg


def test_wrong_type_is_an_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  batch_size: lots\n")
    with pytest.raises(UserError, match="train.batch_size: expected int"):
        load_config(recipe)


def test_method_keys_are_validated_by_the_method(tmp_path):
    with pytest.raises(UserError, match="method.distill_weight"):
        load_config(None, ["method.name=mocov2", "method.distill_weight=3"])
    cfg = load_config(None, ["method.name=disco", "method.distill_weight=3", "teacher.arch=resnet50",
                             "teacher.checkpoint=moco_v2_800ep.pth.tar"])
    assert cfg.method.distill_weight == 3.0


def test_unknown_method_suggests(tmp_path):
    with pytest.raises(UserError, match="did you mean 'disco'"):
        load_config(None, ["method.name=disko"])


def test_set_overrides_and_choices():
    cfg = load_config(None, ["train.epochs=7", "data.loader=torchvision", "student.stem_stride=1"])
    assert (cfg.train.epochs, cfg.data.loader, cfg.student.stem_stride) == (7, "torchvision", 1)
    with pytest.raises(UserError, match="data.loader"):
        load_config(None, ["data.loader=fast"])
    with pytest.raises(UserError, match="key=value"):
        load_config(None, ["train.epochs"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
