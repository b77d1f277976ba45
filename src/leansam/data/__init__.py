"""Datasets and prompt simulation."""
