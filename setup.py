"""The build step pyproject.toml cannot declare: compile the native PID 1
(daemon/sandbox/native/sandboxd-init.c) into the package. Needs gcc and a static libc
(Debian: gcc, libc6-dev); everything else is in pyproject.toml."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithNative(build_py):
    """build_py, then gcc: the binary lands beside its sources in the built package."""

    def run(self) -> None:
        super().run()
        # Loaded by path: the package's own dependencies need not be installed to build it.
        spec = importlib.util.spec_from_file_location(
            "sandboxd_native_build", HERE / "daemon" / "sandbox" / "native" / "__init__.py"
        )
        assert spec is not None and spec.loader is not None
        builder = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(builder)
        output = Path(self.build_lib) / "daemon" / "sandbox" / "native" / "sandboxd-init"
        if getattr(self, "editable_mode", False):
            # An editable install runs the package from this tree: the binary goes here.
            output = builder.BINARY
        self.announce(f"compiling {output}", level=2)
        builder.build(output)


class BinaryDistribution(Distribution):
    """A wheel holding a compiled binary is for this platform only."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_py": BuildPyWithNative}, distclass=BinaryDistribution)
