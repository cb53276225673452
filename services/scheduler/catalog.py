"""What the scheduler routes tasks to, each with queues of its own, and so bounded: the
pools tasks may name (``LEVERET_POOLS`` plus those workers announced) and the distinct
requirement sets (``LEVERET_MAX_REQUIREMENT_SETS``).

A submission to a pool the scheduler does not know is refused (`unknown_pool`), and so
is one whose requirement set would be one too many (`too_many_requirement_sets`):
neither ever makes a queue. Both lists are remembered in the scheduler's store, so a
restart changes nothing; admission's flusher is their only writer at admission.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence, Set

from leveret.errors import SubmissionError
from leveret.scheduler.store import Submission
from leveret.topology import requirement_key

#: Pools learned from worker announcements, at most (an announcement is a message
#: anyone with access to the events exchange can send): beyond, new ones are ignored.
MAX_ANNOUNCED_POOLS = 1000
#: Names listed in a refusal, at most.
_SHOWN = 20


def _listing(names: Iterable[str]) -> str:
    ordered = sorted(names)
    more = len(ordered) - _SHOWN
    return ", ".join(ordered[:_SHOWN]) + (f" and {more} more" if more > 0 else "")


class PoolCatalog:
    """The pools tasks may be submitted to: configured ones plus those workers announced."""

    def __init__(self, configured: Iterable[str] = ("default",)) -> None:
        self._configured = frozenset(configured)
        self._announced: set[str] = set()

    def add(self, names: Iterable[str]) -> set[str]:
        """Learn announced pools; return the ones that are new (none past the bound)."""
        new = set(names) - self._configured - self._announced
        room = MAX_ANNOUNCED_POOLS - len(self._announced)
        new = set(sorted(new)[: max(room, 0)])
        self._announced |= new
        return new

    def __contains__(self, pool: object) -> bool:
        return pool in self._configured or pool in self._announced

    def __len__(self) -> int:
        return len(self._configured | self._announced)

    def names(self) -> list[str]:
        """Every allowed pool, sorted."""
        return sorted(self._configured | self._announced)

    def check(self, subs: Sequence[Submission]) -> None:
        """Refuse a request naming a pool that is not allowed."""
        for s in subs:
            pool = s.message.pool
            if pool not in self:
                raise SubmissionError(
                    "unknown_pool",
                    f"unknown pool {pool!r}; allowed pools: {_listing(self.names()) or 'none'} "
                    "(LEVERET_POOLS on the scheduler, or a worker of the pool started)",
                    422,
                )


class RequirementSets:
    """The distinct requirement sets (per pool: one queue each) tasks were admitted with,
    at most `limit`."""

    def __init__(self, limit: int, known: Iterable[str] = ()) -> None:
        self.limit = limit
        self._keys: set[str] = set(known)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def new_keys(self, subs: Sequence[Submission], pending: Set[str] = frozenset()) -> set[str]:
        """The keys of the sets in `subs` not admitted before; raises a
        :class:`SubmissionError` if they, with `pending` (new sets of requests admitted
        just before), would take the count over the limit."""
        keys = {
            requirement_key(s.message.pool, s.message.requires) for s in subs if s.message.requires
        }
        new = keys - self._keys
        if new - pending and len(self._keys) + len(pending | new) > self.limit:
            raise SubmissionError(
                "too_many_requirement_sets",
                f"the scheduler routes {len(self._keys)} distinct requirement sets (each pool's "
                f"own) and the limit is {self.limit} (LEVERET_MAX_REQUIREMENT_SETS); a task "
                "may still require a set already in use",
                422,
            )
        return new

    def add(self, keys: Iterable[str]) -> None:
        """Count sets as admitted (once they are remembered in the store)."""
        self._keys.update(keys)
