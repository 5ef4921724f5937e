"""Build of hpa-kernels (metadata lives in pyproject.toml)."""

from setuptools import setup

setup()
