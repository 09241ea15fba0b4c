"""Alembic migrations of the run registry (run programmatically; see ``workbench.registry.store``)."""
