"""The machine line every benchmark prints first (re-exported from the package)."""

from policies.machine import machine_line  # noqa: F401
