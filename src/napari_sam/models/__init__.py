"""Model types: the registry (:mod:`.registry`), its entries (:mod:`.zoo`), architectures
(:mod:`.sam_vit`), weights files (:mod:`.weights`) and checkpoint loading (:mod:`.state_dict`).

Importing this package registers the project's model types; it does not import torch.
"""

from . import zoo  # noqa: F401  (registers the model types)
from .registry import (
    AUTO,
    DEVICES,
    ModelEntry,
    ModelSpec,
    amg_thresholds,
    architecture,
    as_spec,
    build_model,
    bundled_model_type,
    canonical_type,
    create_model,
    default_model_type,
    detect_model_type,
    load_weights,
    model_choices,
    model_entry,
    model_types,
    register_model,
    resolve_device,
    unregister_model,
)
from .sam_vit import SamConfig
from .state_dict import CheckpointError, read_state_dict

__all__ = [
    "AUTO", "DEVICES", "CheckpointError", "ModelEntry", "ModelSpec", "SamConfig", "amg_thresholds", "architecture",
    "as_spec", "build_model", "bundled_model_type", "canonical_type", "create_model", "default_model_type", "detect_model_type",
    "load_weights", "model_choices", "model_entry", "model_types", "read_state_dict", "register_model",
    "resolve_device", "unregister_model",
]
