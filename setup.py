"""Build the optional C speedup; everything else is declared in pyproject.toml."""

from __future__ import annotations

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "migrelay._speedups",
            sources=["src/migrelay/_speedups.c"],
            extra_compile_args=["-O3"],
            # Without a compiler the package still installs and masks in pure Python,
            # and says so (migrelay --version, and a warning at start-up).
            optional=True,
        )
    ]
)
