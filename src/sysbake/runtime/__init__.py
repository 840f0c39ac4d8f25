"""Containers without a daemon: bundles, overlays, the monitor, owners, exec."""
