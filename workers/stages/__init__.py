"""The pipeline stages, one module each; WIRING lists them in pipeline order."""
