"""Placeholder demo, replaced below."""
