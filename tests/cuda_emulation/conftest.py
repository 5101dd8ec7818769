"""Fixtures of the emulated CUDA tests: the emulator library (built once per session, cached under
build/cuda_emulation/) and the thread schedules each test runs under (README.md).

``FUSEDECODE_EMULATION_SCHEDULES``: a comma-separated list of SCHEDULES, or ``all``
(``make cuda-emulated``); ``make test`` runs warps_ahead only, the schedule that exposes the most.
"""

import os

import pytest

from cuda_emulation import build
from cuda_emulation.emulator import Emulator, Schedule

SCHEDULES = {
    "ascending": Schedule("ascending", "ascending"),
    "descending": Schedule("descending", "descending"),
    "warps_ahead": Schedule("warps_ahead", "random"),
    "random": Schedule("random", "random"),
}


def _schedule_names():
    wanted = os.environ.get("FUSEDECODE_EMULATION_SCHEDULES", "warps_ahead")
    names = list(SCHEDULES) if wanted == "all" else wanted.split(",")
    unknown = [name for name in names if name not in SCHEDULES]
    if unknown:
        raise ValueError(f"FUSEDECODE_EMULATION_SCHEDULES: unknown schedule(s) {unknown}; use {list(SCHEDULES)} or all")
    return names


@pytest.fixture(scope="session")
def emulator_library():
    if not build.source_tree_present():
        pytest.skip("no source tree (csrc/) here: the emulated tests need the CUDA sources")
    if build.compiler() is None:
        pytest.skip("no C++ compiler on PATH (set CXX): the CUDA emulation is not built")
    return Emulator(build.build())


@pytest.fixture(params=_schedule_names())
def emulator(request, emulator_library, generator):
    """The emulator under one schedule; the random one is seeded like the test's generator (the run's
    FUSEDECODE_TEST_SEED and the test's id), so a failure replays."""
    emulator_library.schedule = SCHEDULES[request.param]._replace(seed=generator.initial_seed())
    return emulator_library
