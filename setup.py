"""Maps the one import root `fastgrpo` onto the folders that hold its parts (PEP 420 namespace):
the wire format (proto/python), helpers both services share (common/python), the two services,
the client, the fixture builder (which needs both services) and the benchmarks."""
from setuptools import find_namespace_packages, setup

ROOTS = ["proto/python", "common/python", "services/rollout", "services/learner", "clients/python", "fixture", "benchmarks"]

packages, package_dir = [], {}
for root in ROOTS:
    for name in find_namespace_packages(where=root, include=["fastgrpo.*"]):
        if "__pycache__" in name:
            continue
        packages.append(name)
        package_dir[name] = f"{root}/{name.replace('.', '/')}"

setup(packages=packages, package_dir=package_dir)
