"""The recipe: its schema (schema.py), how files, `extends` and `--set` become one validated Recipe
(source.py), what it will do before it runs (plan.py) and its resolved form (resolved.py)."""
from .schema import (DataConfig, EvalConfig, ExportConfig, FieldMap, LoraConfig, ModelConfig, OPTIMIZERS, QUANTS, Recipe,
                     GateTargets, StageConfig, TargetsConfig, TrainConfig, check_defaults_file, is_defaults_file,
                     load_recipe)

__all__ = ["DataConfig", "EvalConfig", "ExportConfig", "FieldMap", "LoraConfig", "ModelConfig", "OPTIMIZERS", "QUANTS", "Recipe",
           "GateTargets", "StageConfig", "TargetsConfig", "TrainConfig", "check_defaults_file", "is_defaults_file", "load_recipe"]
