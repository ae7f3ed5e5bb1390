"""Reusable network blocks shared by several models."""
