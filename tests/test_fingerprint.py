"""A stage's fingerprint (runner/train/fingerprint.py): what is in it and what is left out, checked key by key on
the two-stage tiny recipe (nothing is trained here)."""
from __future__ import annotations

import os
import shutil

import pytest

from runner.recipe import load_recipe
from runner.recipe.resolved import resolved_yaml
from runner.train.fingerprint import stage_fingerprints, what_changed
from train_support import two_stage_recipe


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return two_stage_recipe(tmp_path_factory.mktemp("fingerprint"))


def prints(path, *sets) -> dict[str, str]:
    return {name: fp.digest for name, fp in stage_fingerprints(load_recipe(path, list(sets)), ranks=1).items()}


def test_keys_that_cannot_change_the_weights_are_left_out(path, tmp_path):
    assert prints(path, "stages.0.train.logging_steps=3", "stages.1.train.eval_steps=4", "stages.0.train.save_steps=3",
                  "stages.0.train.eval_batch_size=2", "stages.1.train.gradient_checkpointing=true", "name=other",
                  f"output_dir={tmp_path}", "export={quantization: f16}", "targets={stop_rate: 0.5}",
                  "allow_cpu_fallback=true") == prints(path)


def test_an_edit_of_the_last_stage_changes_only_that_stage(path):
    before, after = prints(path), prints(path, "stages.1.train.learning_rate=1e-4")
    assert after["general"] == before["general"] and after["vet"] != before["vet"]


def test_an_edit_of_the_first_stage_changes_the_stages_that_start_from_it(path):
    before = prints(path)
    assert all(prints(path, "stages.0.data.max_samples=40")[s] != before[s] for s in ("general", "vet"))
    for init in ("continue", "merge"):
        assert prints(path, f"stages.1.init={init}", "stages.0.train.learning_rate=1e-3")["vet"] != \
            prints(path, f"stages.1.init={init}")["vet"]
    fresh = prints(path, "stages.1.init=fresh")  # a fresh stage does not start from the one before
    assert prints(path, "stages.1.init=fresh", "stages.0.train.learning_rate=1e-3")["vet"] == fresh["vet"]


@pytest.mark.parametrize("edit", ["backend=axolotl", "backend=unsloth", "seed=8", "lora.r=8", "lora.dropout=0.1",
                                  "model.max_seq_length=96", "model.dtype=bfloat16", "model.chat_template=chatml",
                                  "stages.1.data.val_size=4", "stages.1.train.packing=true", "stages.1.train.keep=best"])
def test_what_decides_the_weights_is_in(path, edit):
    assert prints(path, edit)["vet"] != prints(path)["vet"]


def test_eval_steps_count_when_the_best_evaluation_is_kept(path):
    best = prints(path, "stages.1.train.keep=best")
    assert prints(path, "stages.1.train.keep=best", "stages.1.train.eval_steps=4")["vet"] != best["vet"]


def test_data_is_known_by_its_content_not_its_path_or_time(path, tmp_path):
    before = prints(path)
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    for name in ("recipe.yaml", "general.jsonl", "vet.jsonl"):
        shutil.copy(path.parent / name, copy / name)
    os.utime(copy / "vet.jsonl", (1, 1))
    assert prints(copy / "recipe.yaml") == before  # moved and touched: the same content
    anchored = tmp_path / "anchored.yaml"  # the run directory's recipe.yaml: absolute paths
    anchored.write_text(resolved_yaml(load_recipe(path).anchored()))
    assert prints(anchored) == before
    with (copy / "vet.jsonl").open("a") as f:
        f.write('{"messages": [{"role": "user", "content": "one more"}, {"role": "assistant", "content": "yes"}]}\n')
    edited = prints(copy / "recipe.yaml")
    assert edited["general"] == before["general"] and edited["vet"] != before["vet"]


def test_what_changed_names_keys_as_set_spells_them(path):
    old = stage_fingerprints(load_recipe(path), ranks=1)["vet"].inputs
    new = stage_fingerprints(load_recipe(path, ["stages.1.train.learning_rate=1e-4", "lora.r=8"]), ranks=1)["vet"].inputs
    assert what_changed(old, new, 1) == ["lora.r: 4 -> 8", "stages.1.train.learning_rate: 0.005 -> 1e-4"]


def test_a_data_section_is_digested_whole_whatever_its_shape(path):
    """A list of sources is more content; an item naming another stage stands for that stage's data."""
    from runner.train.fingerprint import data_identity, source_identity

    recipe = load_recipe(path)
    mixed = data_identity([{"source": "vet.jsonl", "weight": 0.9}, {"stage": "general", "weight": 0.1}], recipe)
    assert mixed[0] == {"source": source_identity("vet.jsonl", path.parent), "weight": 0.9}
    assert mixed[1]["stage"]["name"] == "general"
    assert mixed[1]["stage"]["data"]["source"] == source_identity("general.jsonl", path.parent)
    assert mixed[1]["stage"]["data"]["source"].startswith("sha256:") and mixed[0]["source"] != mixed[1]["stage"]["data"]["source"]
