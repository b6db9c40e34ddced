"""Integrations with other frameworks (imported lazily: nothing here imports xfuser)."""
