"""transformer chapter."""
