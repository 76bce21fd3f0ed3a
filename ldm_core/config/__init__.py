"""Typed settings (dataclasses with their defaults and checks), YAML presets, and `key=value` overrides."""
