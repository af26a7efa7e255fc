"""Datasets edgetune generates itself, for the quick start and the tests."""
