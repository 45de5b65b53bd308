"""Thin: the definitions of every stage in flywheel/defs, with the default resources."""

from flywheel.defs import build_definitions

defs = build_definitions()
