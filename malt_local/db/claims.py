"""Claims: several processes share one database's work, one item at a time each.

A box with several GPUs runs one `malt run` (or `malt eval`) per GPU on the same database. Each
item of the work (a question's tree, a question's judge verdicts, an evaluation chunk) is built
by the process that holds its claim: a `claims` row naming the holder (host:pid:token) with a
lease. Three rules keep the processes from colliding:

- A claim is taken in a BEGIN IMMEDIATE transaction, so no other process writes between the
  look ("no live claim, not done") and the write.
- Every result is stored in a transaction that first renews the holder's claim
  (`Claims.keep`); a process whose lease has lapsed (killed, suspended, stalled) finds the claim
  gone and drops its result, so nothing is stored after another process has taken the item
  over, and the new holder plans from what is stored once it holds the claim.
- A heartbeat thread renews the leases of a live process between results; a process killed
  with SIGKILL stops renewing, and its items are taken over once their lease lapses. A process
  that ends any other way (done, Ctrl-C, SIGTERM, an error) lets go of its claims at once.

The lease is `MALT_CLAIM_LEASE` seconds (default 120): long enough for a slow node on a loaded
machine, short enough that a dead process's questions are not left waiting long.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence

from malt_local.db.store import BUSY_TIMEOUT, Store, utcnow
from malt_local.engines.base import GenRequest, RequestQueue
from malt_local.errors import MaltError

LEASE_ENV = "MALT_CLAIM_LEASE"
DEFAULT_LEASE = 120.0
# Seconds between looks for a free item when none was (other processes hold them all).
CLAIM_RETRY = 1.0


def lease_seconds() -> float:
    raw = os.environ.get(LEASE_ENV)
    if not raw:
        return DEFAULT_LEASE
    try:
        value = float(raw)
    except ValueError:
        raise MaltError(f"{LEASE_ENV}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise MaltError(f"{LEASE_ENV} must be positive (got {raw})")
    return value


_holder: tuple[int, str] | None = None


def process_holder() -> str:
    """This process's holder id, host:pid:token (the token tells a reused pid from the process
    that had it before); one per process, so its tree, judge and eval claims share it."""
    global _holder
    if _holder is None or _holder[0] != os.getpid():
        _holder = (os.getpid(), f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}")
    return _holder[1]


class Claims:
    """One process's claims on the items of one scope of one run."""

    def __init__(
        self,
        store: Store,
        scope: str,
        run_id: str,
        *,
        holder: str | None = None,
        lease: float | None = None,
        remember_done: bool = True,
    ) -> None:
        self.store = store
        # False where an item can gain work later (an evaluation grown by more samples or
        # votes): a finished item's claim is dropped, and whoever takes it next plans from
        # what is stored, which finds nothing left when nothing is.
        self.remember_done = remember_done
        self.scope = scope
        self.run_id = run_id
        self.holder = holder or process_holder()
        self.lease = lease if lease is not None else lease_seconds()
        self._heartbeat: _Heartbeat | None = None

    # taking -------------------------------------------------------------------------------

    def _state(self, item: str, now: float) -> str:
        """'free' (no claim, or a lapsed one), 'mine', 'done' or 'held' (live, elsewhere)."""
        row = self.store.db.execute(
            "SELECT holder, expires_at, done FROM claims WHERE scope = ? AND run_id = ? "
            "AND item = ?",
            [self.scope, self.run_id, item],
        ).fetchone()
        if row is None:
            return "free"
        holder, expires_at, done = row
        if done:
            return "done"
        if holder == self.holder:
            return "mine"
        return "free" if expires_at < now else "held"

    def _take(self, item: str, now: float) -> None:
        self.store.db.execute(
            "INSERT OR REPLACE INTO claims (scope, run_id, item, holder, expires_at, done, "
            "claimed_at) VALUES (?, ?, ?, ?, ?, 0, ?)",
            [self.scope, self.run_id, item, self.holder, now + self.lease, utcnow()],
        )

    def try_take(self, items: Sequence[str]) -> tuple[str | None, list[str], list[str]]:
        """Claim the first item of `items` that is free, in one write transaction.

        Returns (the item taken or None, items found done, items held live by others) for the
        items looked at before it.
        """
        done: list[str] = []
        held: list[str] = []
        with self.store.immediate():
            now = time.time()
            for item in items:
                state = self._state(item, now)
                if state in ("free", "mine"):
                    self._take(item, now)
                    return item, done, held
                (done if state == "done" else held).append(item)
        return None, done, held

    def keep(self, item: str) -> bool:
        """Inside the caller's write transaction: renew the claim; False when it was lost."""
        cur = self.store.db.execute(
            "UPDATE claims SET expires_at = ? WHERE scope = ? AND run_id = ? AND item = ? "
            "AND holder = ? AND done = 0",
            [time.time() + self.lease, self.scope, self.run_id, item, self.holder],
        )
        return cur.rowcount == 1

    def finish(self, item: str) -> None:
        """Mark an item done (kept with its holder, who finished it), or let it go."""
        sql = (
            "UPDATE claims SET done = 1" if self.remember_done else "DELETE FROM claims"
        ) + " WHERE scope = ? AND run_id = ? AND item = ? AND holder = ?"
        with self.store.db.atomic():
            self.store.db.execute(sql, [self.scope, self.run_id, item, self.holder])

    def reopen(self, items: Sequence[str]) -> None:
        """Forget that these items were done: what is stored says they are not (nodes or
        verdicts deleted by hand, a tree cut back to be rebuilt), and the data, not the claim,
        is the truth. Whoever takes one next plans from what is stored."""
        with self.store.db.atomic():
            self.store.db.conn.executemany(
                "DELETE FROM claims WHERE scope = ? AND run_id = ? AND item = ? AND done = 1",
                [(self.scope, self.run_id, item) for item in items],
            )

    def is_done(self, item: str) -> bool:
        return self._state(item, time.time()) == "done"

    # lifetime -----------------------------------------------------------------------------

    def start(self) -> Claims:
        """Renew this holder's leases every third of a lease, from a thread of its own."""
        if self._heartbeat is None:
            self._heartbeat = _Heartbeat(self)
            self._heartbeat.start()
        return self

    def release(self) -> None:
        """Let go of every unfinished claim (done ones stay), so others need not wait."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        # The process is ending (maybe on a full disk): a release that cannot be written only
        # means the others wait for the lease to lapse.
        with contextlib.suppress(sqlite3.Error):
            self.store.db.execute(
                "DELETE FROM claims WHERE scope = ? AND run_id = ? AND holder = ? AND done = 0",
                [self.scope, self.run_id, self.holder],
            )

    def __enter__(self) -> Claims:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Heartbeat(threading.Thread):
    """Renews the holder's live claims on its own connection (sqlite3 objects stay in their
    thread); llama.cpp releases the GIL while it decodes, so this runs during long steps."""

    def __init__(self, claims: Claims) -> None:
        super().__init__(name="malt-claims-heartbeat", daemon=True)
        self.claims = claims
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=BUSY_TIMEOUT)

    def run(self) -> None:
        c = self.claims
        conn = sqlite3.connect(str(c.store.path), isolation_level=None, timeout=BUSY_TIMEOUT)
        try:
            while not self._stop_event.wait(c.lease / 3):
                # A failed renewal (busy, disk full) is retried at the next beat; the lease
                # outlasts two missed beats.
                with contextlib.suppress(sqlite3.Error):
                    conn.execute(
                        "UPDATE claims SET expires_at = ? WHERE scope = ? AND run_id = ? "
                        "AND holder = ? AND done = 0",
                        [time.time() + c.lease, c.scope, c.run_id, c.holder],
                    )
        finally:
            conn.close()


class ClaimCursor:
    """Walks a list of items in order, claiming them one at a time.

    Items found done are passed for good; items held live by another process are looked at
    again when the walk is over (their holder may die, or finish them).
    """

    def __init__(self, claims: Claims, items: Sequence[str]) -> None:
        self.claims = claims
        self._items = list(items)
        self._pos = 0
        self._held: list[str] = []

    def next(self) -> str | None:
        """The next item claimed, or None when none is free now."""
        if self._pos < len(self._items):
            item, done, held = self.claims.try_take(self._items[self._pos :])
            self._pos += len(done) + len(held) + (item is not None)
            self._held += held
            if item is not None:
                return item
        if not self._held:
            return None
        item, done, held = self.claims.try_take(self._held)
        seen = len(done) + len(held) + (item is not None)
        self._held = held + self._held[seen:]
        return item

    def watch(self, item: str) -> None:
        """Wait for an item claimed and then lost (another process took it over) to be done."""
        if item not in self._held:
            self._held.append(item)

    def pause(self) -> None:
        """Wait a moment before looking again for items others hold."""
        time.sleep(min(CLAIM_RETRY, self.claims.lease / 4))

    @property
    def waiting(self) -> bool:
        """Items other live processes hold remain (the walk is not over until they are done)."""
        return self._pos < len(self._items) or bool(self._held)


class ClaimingQueue(RequestQueue):
    """A request queue that claims more work when the engine asks for work and has none.

    An engine pops while it has free sequences, so a process claims only as many items as it
    can start; the rest stay free for the other processes on the database.
    """

    def __init__(self, refill: Callable[[], bool]) -> None:
        super().__init__()
        self._refill = refill

    def pop(self) -> GenRequest | None:
        if not len(self):
            self._refill()
        return super().pop()

    def pop_with_priority(self) -> tuple[tuple, GenRequest] | None:
        if not len(self):
            self._refill()
        return super().pop_with_priority()
