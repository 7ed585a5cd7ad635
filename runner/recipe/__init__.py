"""The recipe: its schema (schema.py), how files, `extends` and `--set` become one validated Recipe
(source.py), what it will do before it runs (plan.py) and its resolved form (resolved.py)."""
from .schema import (LLAMA_CPP_QUANTS, OPTIMIZERS, QUANTS, TENSOR_TYPES, TRACKERS, WRITER_QUANTS, ChatConfig,
                     DataConfig, EvalConfig, ExportConfig, FieldMap, GateTargets, LoraConfig, ModelConfig, Recipe, ReplayItem,
                     SourceItem, StageConfig, TargetsConfig, TrainConfig, check_defaults_file, is_defaults_file,
                     load_recipe)

__all__ = ["ChatConfig", "DataConfig", "EvalConfig", "ExportConfig", "FieldMap", "GateTargets", "LLAMA_CPP_QUANTS", "LoraConfig",
           "ModelConfig", "OPTIMIZERS", "QUANTS", "Recipe", "ReplayItem", "SourceItem", "StageConfig", "TENSOR_TYPES",
           "TRACKERS", "TargetsConfig", "TrainConfig", "WRITER_QUANTS", "check_defaults_file", "is_defaults_file",
           "load_recipe"]
