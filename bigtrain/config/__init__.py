"""The recipe: its schema (one frozen dataclass per section, help per field), loading (YAML, `section.key=value`
overrides, key and type checks) and the cross-field rules, all checked before anything is built. Imports only
core (and yaml); every other layer may import it. Re-exports the names `from bigtrain.config import X` gave when
this was one module."""

from bigtrain.config.load import build_config, dump_yaml, load_config, load_raw
from bigtrain.config.schema import (
    SECTIONS,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    LoraConfig,
    MixtureSource,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    TaskConfig,
    TrainConfig,
    describe,
)
from bigtrain.config.validate import recipe_warnings, validate

__all__ = [
    "SECTIONS", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "EvalConfig", "LoggingConfig",
    "LoraConfig", "MixtureSource", "ModelConfig", "OptimConfig", "ParallelConfig", "RunConfig", "TaskConfig",
    "TrainConfig", "build_config", "describe", "dump_yaml", "load_config", "load_raw", "recipe_warnings", "validate",
]
