"""avprep: raw audio-visual datasets → verified WebDataset shards (README: Preparing data).

Public API::

    from avprep import extract, ExtractConfig, spec_preset
    cfg = ExtractConfig(spec=spec_preset("paper", "cremad"))
    result = extract("cremad", "RAW", "OUT", cfg, workers=4)

Heavy decoders (PyAV) are imported by the modules that need them, not here; nothing
in avprep imports torch.
"""
from .config import PRESET_NAMES, ExtractConfig, SpecConfig, spec_preset
from .errors import AvprepError, ClipError, ConfigError, DatasetLayoutError, StorageError
from .extract import ExtractEvent, ExtractResult, extract

__all__ = ["extract", "ExtractConfig", "ExtractEvent", "ExtractResult", "SpecConfig", "spec_preset",
           "PRESET_NAMES", "AvprepError", "ClipError", "ConfigError", "DatasetLayoutError",
           "StorageError"]
