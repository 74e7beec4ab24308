"""pytest plugin (``-p conformance_worst``, with this folder on PYTHONPATH): the conformance suite's table of each
backend's worst relative error, under pytest-xdist too.

tests/conformance/cases.py collects the errors in ``WORST`` and its conftest prints them at the end of the run,
but under xdist every worker fills its own ``WORST`` and the controller, which prints, has none. Each worker
hands its ``WORST`` to the controller, which merges them as ``cases.record`` does (max, a NaN stays NaN).
"""

from __future__ import annotations

import math
import sys

import pytest


def _worst() -> dict | None:
    cases = sys.modules.get("conformance.cases")
    return None if cases is None else cases.WORST


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)  # set on xdist workers only
    worst = _worst()
    if workeroutput is not None and worst:
        workeroutput["conformance_worst"] = [[*key, err] for key, err in worst.items()]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    worst = _worst()
    if worst is None:
        return
    for *key, err in getattr(node, "workeroutput", {}).get("conformance_worst", []):
        key = tuple(key)
        previous = worst.get(key, 0.0)
        worst[key] = math.nan if math.isnan(err) or math.isnan(previous) else max(previous, err)
