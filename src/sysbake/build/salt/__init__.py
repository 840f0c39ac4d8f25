"""Salt in build steps: its toolchain and its runs."""
