"""simulate: see the modules of this package."""
