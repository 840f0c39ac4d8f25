"""The build pipeline: bootstrap, provision steps, finalize, the stage cache."""
