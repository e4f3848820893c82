"""cnn chapter."""
