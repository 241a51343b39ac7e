"""SQL over the atlas: its views and aggregates, and the summary tables."""
