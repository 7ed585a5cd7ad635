"""Stage inits really start where they say: `continue` from the previous adapter, `merge` from the base with
it merged in (plus a fresh adapter), `fresh` from the base. Checked on the weights at the new stage's step 0."""
from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from runner.model.load import build_stage_model
from runner.pipeline import train_recipe
from runner.recipe import load_recipe
from runner.run_dir import RunDir, StageOutcome
from train_support import two_stage_recipe


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("init")
    recipe = load_recipe(two_stage_recipe(folder), ["stages.1.train.max_steps=2"])
    train_recipe(recipe, only_stage="general", log=lambda m: None)
    return recipe, RunDir.of(recipe).path / "general" / "adapter", recipe.model.base


def _base(path):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _logits(model):
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_continue_starts_from_the_previous_adapter_and_trains_it(stage1):
    recipe, adapter, base = stage1
    previous = StageOutcome("general", "done", str(adapter))
    assert previous.lineage_after("continue") == []
    model = build_stage_model(_base(base), "continue", recipe.lora, adapter, [], False, False)
    saved = load_file(adapter / "adapter_model.safetensors")
    state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(saved) == len(state) > 0
    for name, value in saved.items():
        match = [v for k, v in state.items() if k.replace(".default", "").endswith(name.split("base_model.model.")[-1])]
        assert len(match) == 1 and torch.equal(match[0], value), name
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    trained = PeftModel.from_pretrained(_base(base), str(adapter))
    assert torch.allclose(_logits(model), _logits(trained), atol=1e-6)


def test_merge_starts_from_base_plus_adapter_with_a_fresh_adapter(stage1):
    recipe, adapter, base = stage1
    lineage = StageOutcome("general", "done", str(adapter)).lineage_after("merge")
    assert lineage == [str(adapter)]
    model = build_stage_model(_base(base), "merge", recipe.lora, adapter, lineage, False, False)
    merged = PeftModel.from_pretrained(_base(base), str(adapter)).merge_and_unload()
    assert torch.allclose(_logits(model), _logits(merged), atol=1e-5)  # the new adapter starts at zero
    assert not torch.allclose(_logits(model), _logits(_base(base)), atol=1e-4)
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_fresh_starts_from_the_base(stage1):
    recipe, adapter, base = stage1
    assert StageOutcome("general", "done", str(adapter)).lineage_after("fresh") == []
    model = build_stage_model(_base(base), "fresh", recipe.lora, adapter, [], False, False)
    assert torch.allclose(_logits(model), _logits(_base(base)), atol=1e-6)


def test_stage_that_needs_an_unfinished_stage_is_refused(stage1):
    from runner.errors import TunebookError

    recipe, _, _ = stage1
    fresh = load_recipe(recipe.path, ["name=other"])
    with pytest.raises(TunebookError, match="has not finished"):
        train_recipe(fresh, only_stage="vet", log=lambda m: None)


def test_merge_stage_trains_end_to_end_and_records_lineage(tmp_path):
    recipe = load_recipe(two_stage_recipe(tmp_path, init="merge"))
    outcomes = train_recipe(recipe, log=lambda m: None)
    assert outcomes[1].lineage == [outcomes[0].adapter]
