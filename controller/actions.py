"""The action contract: a discrete set of ``(k, width)`` choices, ``k = 0`` meaning off.

ARCHITECTURE.md contract 3.  The action list is built from the largest speculative
length and the widths a policy is trained for; widths the engine does not support (its
trace header's ``widths``) are masked, and :meth:`ActionSet.map_to_supported` maps a
masked choice to the nearest supported one so a policy never sends the engine a shape
it cannot run.

    >>> a = ActionSet(max_k=2, widths=[1, 2])
    >>> a.actions
    [(0, 1), (1, 1), (1, 2), (2, 1), (2, 2)]
    >>> a.mask(supported_widths=[1]).tolist()
    [True, True, False, True, False]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ActionSet:
    max_k: int
    widths: list[int] = field(default_factory=lambda: [1])

    def __post_init__(self):
        if not isinstance(self.max_k, int) or self.max_k < 1:
            raise ValueError(f"max_k must be an int >= 1, got max_k={self.max_k!r}")
        if not self.widths or any((not isinstance(w, int)) or w < 1 for w in self.widths):
            raise ValueError(f"widths must be a non-empty list of ints >= 1, got widths={self.widths!r}")
        object.__setattr__(self, "widths", sorted(set(self.widths)))

    @property
    def actions(self) -> list[tuple[int, int]]:
        out = [(0, 1)]
        for k in range(1, self.max_k + 1):
            out.extend((k, w) for w in self.widths)
        return out

    @property
    def n(self) -> int:
        return 1 + self.max_k * len(self.widths)

    def index(self, k: int, width: int = 1) -> int:
        """Index of ``(k, width)``; ``k = 0`` ignores the width."""
        if k == 0:
            return 0
        if not 1 <= k <= self.max_k or width not in self.widths:
            raise ValueError(f"action (k={k}, width={width}) is not in this action set "
                             f"(max_k={self.max_k}, widths={self.widths})")
        return 1 + (k - 1) * len(self.widths) + self.widths.index(width)

    def mask(self, supported_widths: list[int] | None = None, max_k: int | None = None) -> np.ndarray:
        """Boolean mask of actions the engine can run (width supported, k <= engine max_k)."""
        sw = set(supported_widths) if supported_widths is not None else set(self.widths)
        mk = self.max_k if max_k is None else max_k
        return np.array([k == 0 or (w in sw and k <= mk) for k, w in self.actions], dtype=bool)

    def map_to_supported(self, index: int, supported_widths: list[int], max_k: int | None = None) -> int:
        """Map an action to the closest supported one: same k with the widest supported width
        not above the chosen width (else the narrowest), k clipped to ``max_k``."""
        k, w = self.actions[index]
        if k == 0:
            return 0
        mk = self.max_k if max_k is None else max_k
        k = min(k, mk)
        if k == 0:
            return 0
        usable = sorted(x for x in self.widths if x in set(supported_widths))
        if not usable:
            raise ValueError(f"no width of {self.widths} is supported by the engine (supports {supported_widths})")
        below = [x for x in usable if x <= w]
        return self.index(k, below[-1] if below else usable[0])
