"""logs: see the modules of this package."""
