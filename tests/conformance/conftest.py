import pytest
import torch

from .cases import BACKENDS, WORST


@pytest.fixture(autouse=True)
def nan_poisoned_allocations():
    """Every tensor a backend allocates without writing starts as NaN (torch fills uninitialised memory in
    deterministic mode), so an output element that a kernel forgets to write fails the comparison."""
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    torch.utils.deterministic.fill_uninitialized_memory = previous[2]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """``(backend name, device)`` for every registered backend and every device it can run on here."""
    return request.param


def pytest_terminal_summary(terminalreporter):
    """The worst relative error (against the float64 oracle) of each backend, dtype and quantity."""
    if not WORST:
        return
    quantities = ("out", "dq", "dk", "dv")
    rows = sorted({key[:2] for key in WORST})
    terminalreporter.section("conformance: worst relative error against the float64 oracle")
    terminalreporter.write_line(f"{'backend':<16}{'dtype':<10}" + "".join(f"{q:>11}" for q in quantities))
    for backend, dtype in rows:
        cells = "".join(f"{WORST.get((backend, dtype, q), float('nan')):>11.2e}" for q in quantities)
        terminalreporter.write_line(f"{backend:<16}{dtype:<10}{cells}")
