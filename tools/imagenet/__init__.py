"""Shared pieces of the stage tools: class lists, file helpers, models, data loading."""
