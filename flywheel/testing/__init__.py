"""Test doubles that speak real protocols (e.g. an OpenAI-compatible HTTP server), shared by the
test suite and the benchmarks so both exercise the same code paths as production."""
