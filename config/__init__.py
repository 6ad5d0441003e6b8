"""Typed configuration: settings from the environment, the model catalog, key and queue names."""

from config.catalog import Catalog, LatencyProfile, ModelSpec, load_catalog
from config.settings import Settings, get_settings

__all__ = ["Catalog", "LatencyProfile", "ModelSpec", "Settings", "get_settings", "load_catalog"]
