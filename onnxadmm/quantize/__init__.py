"""Precision stage: the integer grid (int8) after any structural method; see ``stage.py``."""
