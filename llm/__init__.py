"""llm chapter."""
