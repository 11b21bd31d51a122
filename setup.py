"""Build hook: generate the gRPC stubs from protos/ before packaging (metadata is in pyproject)."""

import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


class BuildPyWithProtos(build_py):
    def run(self):
        runpy.run_path(str(ROOT / "scripts" / "gen_protos.py"))["generate"]()
        # The stub packages did not exist when setuptools listed the packages: add them.
        generated = sorted(
            ".".join(d.relative_to(ROOT).parts) for d in (ROOT / "hera_ray" / "_proto").rglob("*") if (d / "__init__.py").exists()
        )
        self.packages = sorted(set(self.packages or []) | {"hera_ray._proto", *generated})
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
