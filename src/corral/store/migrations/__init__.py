"""Alembic migrations of Corral's store; `corral.store` runs them to head when it opens."""
