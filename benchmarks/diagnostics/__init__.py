"""One-off studies behind the choice of defaults (docs/how-it-works.md): `python -m benchmarks.diagnostics.NAME`."""
