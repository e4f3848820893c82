"""rnn chapter."""
