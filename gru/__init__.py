"""gru chapter."""
