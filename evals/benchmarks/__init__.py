"""Benchmark definitions: data files, prompts, parsers and metrics (POPE, CHAIR)."""
