"""The project file: reading it (reader), its specs, loading a project (load)."""
