"""The domain shifts the grid benchmarks adapt across, on real data (UCI HAPT and the watch set).

- ``cross-subject``: pretrain on UCI-HAR's 21 training users (6 basic activities); adapt to each of
  the 9 test users on the first 80% of each recording segment, test on the rest.
- ``unseen-transitions``: the same base; adapt to all 12 HAPT activities (the 6 postural
  transitions, labels 7-12, were never seen) per test user. Transitions last a few seconds (1-9
  windows per user and class), so the split is by session: each user ran the protocol twice, the
  first performance of each activity is adapted on, the second tested on. The head grows from 6 to
  12 classes (known rows kept).
- ``cross-dataset``: pretrain on all 30 HAPT users (waist smartphone); adapt to each of the 10
  people of the watch set (wrist, the same six channels at 50 Hz, 7 other classes): the head is
  replaced. Split as in cross-subject.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from toolchain.core.errors import ToolchainError
from toolchain.data.sources import HAPT_TEST_USERS, load_data
from toolchain.data.windows import WindowDataset, time_split

Split = tuple[WindowDataset, WindowDataset]


@dataclass(frozen=True)
class Shift:
    """name; ``source``: the data spec the base is pretrained on (``{hapt}`` is the HAPT folder);
    ``held_out``: subjects left out of pretraining; ``target``: the data spec adapted to;
    ``head``: "keep", "expand" (new classes added) or "replace" (other classes)."""

    name: str
    source: str
    held_out: tuple[int, ...]
    target: str
    users: tuple[int, ...]
    head: str
    split: Callable[[WindowDataset], Split]

    def source_spec(self, hapt: str) -> str:
        return self.source.format(hapt=hapt)

    def target_data(self, hapt: str, user: int) -> Split:
        """(adapt, test) windows of one target user."""
        ds = load_data(self.target.format(hapt=hapt))
        if user not in ds.subjects():
            raise ToolchainError(
                f"user {user} is not in the {self.name} target data",
                seen=user,
                remedy=f"choose from {list(self.users)}",
            )
        return self.split(ds.take(ds.subject == user))


def session_split(ds: WindowDataset) -> Split:
    """Per (subject, class): the first half of its segments in time (rounded up) to adapt on, the
    rest to test on. A class recorded once is adapted on only."""
    adapt = np.zeros(len(ds), dtype=bool)
    for s in np.unique(ds.subject):
        for c in np.unique(ds.y[ds.subject == s]):
            segs = np.unique(ds.segment[(ds.subject == s) & (ds.y == c)])  # segment ids follow time order
            first = segs[: (len(segs) + 1) // 2]
            adapt |= (ds.subject == s) & np.isin(ds.segment, first)
    return ds.take(adapt), ds.take(~adapt)


WATCH_USERS = tuple(range(1, 11))

SHIFTS: dict[str, Shift] = {
    s.name: s
    for s in (
        Shift("cross-subject", "hapt:{hapt}", HAPT_TEST_USERS, "hapt:{hapt}", HAPT_TEST_USERS, "keep", time_split),
        Shift(
            "unseen-transitions",
            "hapt:{hapt}",
            HAPT_TEST_USERS,
            "hapt12:{hapt}",
            HAPT_TEST_USERS,
            "expand",
            session_split,
        ),
        Shift("cross-dataset", "hapt:{hapt}", (), "watch", WATCH_USERS, "replace", time_split),
    )
}


def get_shift(name: str) -> Shift:
    if name not in SHIFTS:
        raise ToolchainError("unknown shift", seen=name, remedy=f"choose from {sorted(SHIFTS)}")
    return SHIFTS[name]
