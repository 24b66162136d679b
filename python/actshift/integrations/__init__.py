"""Integrations with model libraries: `transformers` (patch / unpatch, imported lazily by actshift)."""
