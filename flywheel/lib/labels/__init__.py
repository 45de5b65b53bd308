"""labels: see the modules of this package."""
