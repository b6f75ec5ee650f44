"""Test helpers that start real servers."""
