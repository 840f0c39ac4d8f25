"""Unit tests: fast, root-free."""
