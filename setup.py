"""The one thing pyproject.toml cannot say: the repository's ``recipes/`` folder ships as the package ``mm.recipes``.

So ``recipes/tiny/1_align.yaml`` stays the path in a clone, and an installed ``mm`` finds the same files through
``importlib.resources`` (``mm train --recipe tiny/1_align``). Everything else is in pyproject.toml.
"""
from setuptools import find_namespace_packages, setup

setup(packages=[*find_namespace_packages(include=["mm", "mm.*"]), "mm.recipes"], package_dir={"mm.recipes": "recipes"})
