"""Model fixtures (tiny model built from a config, the pip-installed MiniLM)."""
