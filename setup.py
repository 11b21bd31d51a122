"""Build hook: generate the gRPC stubs from protos/ before packaging (metadata is in pyproject)."""

import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithProtos(build_py):
    def run(self):
        runpy.run_path(str(Path(__file__).parent / "scripts" / "gen_protos.py"))["generate"]()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
