"""Offline calibration tools that produce method presets (e.g. VAR's sink dimensions)."""
