"""Compiles the gRPC proto (``hps.v1``) at build time, so generated code is never committed."""

from __future__ import annotations

from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "node_agent" / "proto"


def compile_protos() -> None:
    """Generates ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` beside each ``.proto``."""
    from grpc_tools import protoc  # build requirement, see pyproject.toml

    include = str(Path(protoc.__file__).parent / "_proto")
    for proto in sorted(PROTO_ROOT.rglob("*.proto")):
        rel = proto.relative_to(ROOT)
        # `-I ROOT` makes generated imports read `from node_agent.proto.hps.v1 import ...`.
        args = [
            "grpc_tools.protoc",
            f"-I{ROOT}",
            f"-I{include}",
            f"--python_out={ROOT}",
            f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}",
            str(rel),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {rel}")


class BuildPyWithProto(build_py):
    def run(self) -> None:
        compile_protos()
        super().run()


def packages() -> tuple[list[str], dict[str, str]]:
    """`operator/` would shadow the standard library's `operator`: install it as `hps_operator`."""
    control = ["hps_operator"] + [f"hps_operator.{p}" for p in find_packages("operator")]
    data = [p for p in find_packages(".", include=["node_agent", "node_agent.*"])]
    return control + data, {"hps_operator": "operator"}


def native(name: str, source: str) -> Extension:
    """A compiled loop of the lookup path. Optional: where no C compiler is present the build goes on
    without it and its Python fallback serves (the same answers, more CPU)."""
    return Extension(name, sources=[source], extra_compile_args=["-O3", "-std=c11"], optional=True)


NATIVE = [
    # the L1 cache's query and insert (without: the cache's array version)
    native("node_agent.cache.native._setassoc", "node_agent/cache/native/setassoc.c"),
    # a batch's distinct keys and its inverse, node_agent.dedupe (without: np.unique)
    native("node_agent._dedupe", "node_agent/dedupe.c"),
    # a lookup's HMGET replies straight into its rows, node_agent.tiers.redis_tier (without: hiredis)
    native("node_agent.tiers._resp", "node_agent/tiers/resp.c"),
]

_packages, _package_dir = packages()
setup(packages=_packages, package_dir=_package_dir, ext_modules=NATIVE,
      cmdclass={"build_py": BuildPyWithProto})
