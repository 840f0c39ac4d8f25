"""Registries: the HTTP client, auth, push/pull, what a store learns from them."""
