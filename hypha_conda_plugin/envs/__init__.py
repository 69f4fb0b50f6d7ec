"""Conda environments: what to build (spec), how (builders) and when to reuse (cache)."""
