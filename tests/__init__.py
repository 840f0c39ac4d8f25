"""sysbake's tests (a package, so that tests.unit.conftest's factories can be imported)."""
