"""I/O only: each adapter translates its library's exceptions into flows.core.errors."""
