"""The sandbox engine (public names filled in once all modules land)."""
