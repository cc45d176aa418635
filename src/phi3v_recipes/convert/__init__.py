"""Converters that turn public datasets into the recipes' jsonl + images layout."""
