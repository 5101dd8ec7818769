"""The curated list of plausible bugs for the mutation check (``tests/mutation/run.py``).

Each entry replaces one exact snippet of one file (it must occur exactly once) and names the
narrowest tests expected to catch it. Keep ``find`` short but unique; when code moves, update the
entry rather than deleting it.
"""

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str
    find: str
    replace: str
    tests: Tuple[str, ...]
    description: str

    @property
    def native(self):
        """Whether the extension must be rebuilt for this mutation to take effect."""
        return self.file.startswith("csrc/")


MUTATIONS = []
