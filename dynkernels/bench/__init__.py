"""The product's main job: `python -m dynkernels bench`.

For every op family it builds inputs with dynkernels.testing, checks the
kernel against the reference, then times the kernel, the reference and the
anchors side by side, and reports a table, a JSON file and a PNG plot. The
pytest-benchmark suites in benchmarks/ time the same cases.
"""

from .cases import FAMILIES, Case, Impl, cases_for

__all__ = ["FAMILIES", "Case", "Impl", "cases_for"]
