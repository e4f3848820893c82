"""lstm chapter."""
