"""UsageStore: per-server limit overrides and daily usage counters in one SQLite file (aiosqlite)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import sqlite3
import struct
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Literal

import aiosqlite

from bot.jobs import Charge
from bot.limits import LIMIT_FIELDS, Kind, Policy, Usage, check, day_of

log = logging.getLogger(__name__)

ListName = Literal["channels", "roles", "words"]

SETTABLE_FIELDS: tuple[str, ...] = (*LIMIT_FIELDS, "max_prompt_length")
MAX_PROMPT_LENGTH = 2000  # the same bound as Settings.max_prompt_length

_OVERRIDE_COLUMNS = (*SETTABLE_FIELDS, "nsfw_only", "log_channel_id")
_LISTS: dict[str, tuple[str, str]] = {  # list name -> (table, column)
    "channels": ("allowed_channels", "channel_id"),
    "roles": ("exempt_roles", "role_id"),
    "words": ("banned_words", "word"),
}
_MIGRATION_NAME = re.compile(r"(\d{4})_\w+\.sql")


@dataclass(frozen=True)
class Gallery:
    """What an /imagine result was made from, and by whom. A variation keeps the first `keep` tokens of image
    `parent_index` (0-based) of gallery `parent_id`."""

    guild_id: int
    requester_id: int
    prompt: str
    count: int
    guidance: float
    temperature: float
    seed: int
    keep: tuple[int, ...] = ()
    parent_id: int | None = None
    parent_index: int | None = None


def load_migrations() -> list[tuple[int, str]]:
    """(version, sql) for each bot/migrations/NNNN_*.sql, in version order."""
    found = sorted(
        (int(match[1]), entry.read_text("utf-8"))
        for entry in resources.files("bot").joinpath("migrations").iterdir()
        if (match := _MIGRATION_NAME.fullmatch(entry.name))
    )
    versions = [version for version, _ in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"Two migrations share a number: {versions}")
    return found


class UsageStore:
    """Per-server limits and usage. Every method is one transaction; `charge` checks and counts atomically."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._lock = asyncio.Lock()  # one transaction at a time on this connection

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: Path) -> AsyncIterator[UsageStore]:
        """`async with UsageStore.open(path) as store:` connects and migrates, and closes on exit."""
        store = await cls.connect(path)
        try:
            yield store
        finally:
            await store.close()

    @classmethod
    async def connect(cls, path: Path) -> UsageStore:
        """Open the database at `path` (created if missing, parents too) and bring its schema up to date."""
        path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are our explicit BEGIN/COMMIT. The default 5 s busy timeout lets
        # BEGIN IMMEDIATE wait for another connection's write transaction instead of failing.
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = NORMAL")
            store = cls(db)
            await store._migrate()
        except BaseException:
            await db.close()
            raise
        return store

    async def close(self) -> None:
        await self._db.close()

    async def _migrate(self) -> None:
        for version, sql in load_migrations():
            async with self._transaction() as db:
                # Read inside the write lock, so two processes opening a fresh file migrate it once.
                if await self._user_version(db) >= version:
                    continue
                for statement in _statements(sql):
                    await db.execute(statement)
                await db.execute(f"PRAGMA user_version = {version}")
            log.info("Migrated the usage database to schema version %d", version)

    @staticmethod
    async def _user_version(db: aiosqlite.Connection) -> int:
        (row,) = await db.execute_fetchall("PRAGMA user_version")
        return int(row[0])

    @contextlib.asynccontextmanager
    async def _transaction(self, begin: str = "BEGIN IMMEDIATE") -> AsyncIterator[aiosqlite.Connection]:
        """Run the body in one transaction. BEGIN IMMEDIATE takes SQLite's write lock up front, which
        serialises writers across connections and processes; the asyncio lock does it within this one."""
        async with self._lock:
            await self._db.execute(begin)
            try:
                yield self._db
            except BaseException:
                with contextlib.suppress(sqlite3.OperationalError):  # SQLite may have rolled back already
                    await self._db.execute("ROLLBACK")
                raise
            await self._db.execute("COMMIT")

    # Galleries

    async def save_gallery(self, gallery: Gallery, tokens: Sequence[Sequence[int]] = ()) -> int:
        """Remember a gallery and each image's tokens; returns its id (what its buttons carry)."""
        async with self._transaction() as db:
            async with db.execute(
                "INSERT INTO galleries (guild_id, requester_id, prompt, count, guidance, temperature, seed, "
                "keep, parent_id, parent_index) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    gallery.guild_id,
                    gallery.requester_id,
                    gallery.prompt,
                    gallery.count,
                    gallery.guidance,
                    gallery.temperature,
                    gallery.seed,
                    pack_tokens(gallery.keep),
                    gallery.parent_id,
                    gallery.parent_index,
                ),
            ) as cursor:
                gallery_id = int(cursor.lastrowid or 0)
            async with db.executemany(
                "INSERT INTO gallery_images (gallery_id, idx, tokens) VALUES (?, ?, ?)",
                [(gallery_id, index, pack_tokens(row)) for index, row in enumerate(tokens)],
            ):
                return gallery_id

    async def gallery(self, gallery_id: int) -> Gallery | None:
        async with self._transaction("BEGIN") as db:
            rows = list(
                await db.execute_fetchall(
                    "SELECT guild_id, requester_id, prompt, count, guidance, temperature, seed, keep, "
                    "parent_id, parent_index FROM galleries WHERE id = ?",
                    (gallery_id,),
                )
            )
        if not rows:
            return None
        *fields, keep, parent_id, parent_index = rows[0]
        return Gallery(*fields, keep=unpack_tokens(keep), parent_id=parent_id, parent_index=parent_index)

    async def image_tokens(self, gallery_id: int, index: int) -> tuple[int, ...] | None:
        """The tokens image `index` (0-based) of a gallery was decoded from; None if unknown."""
        async with self._transaction("BEGIN") as db:
            rows = list(
                await db.execute_fetchall(
                    "SELECT tokens FROM gallery_images WHERE gallery_id = ? AND idx = ?", (gallery_id, index)
                )
            )
        return unpack_tokens(rows[0][0]) if rows else None

    async def add_gallery_messages(
        self, gallery_id: int, channel_id: int, message_ids: Sequence[int]
    ) -> None:
        """Remember the messages (in one channel) a gallery was posted in."""
        rows = [(gallery_id, channel_id, message_id) for message_id in message_ids]
        async with (
            self._transaction() as db,
            db.executemany(
                "INSERT INTO gallery_messages (gallery_id, channel_id, message_id) VALUES (?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                rows,
            ),
        ):
            pass  # the cursor closes here: an open one would keep the WAL from being checkpointed at close

    async def gallery_messages(self, gallery_id: int) -> list[tuple[int, int]]:
        """(channel id, message id) of each message a gallery was posted in, oldest first."""
        async with self._transaction("BEGIN") as db:
            rows = list(
                await db.execute_fetchall(
                    "SELECT channel_id, message_id FROM gallery_messages WHERE gallery_id = ? "
                    "ORDER BY message_id",
                    (gallery_id,),
                )
            )
        return [(channel_id, message_id) for channel_id, message_id in rows]

    # Prompts suggested by /describe

    async def save_prompts(self, guild_id: int, requester_id: int, prompts: Sequence[str]) -> list[int]:
        """Remember prompts written for a member; returns their ids (what the Imagine buttons carry)."""
        async with self._transaction() as db:
            ids = []
            for prompt in prompts:
                async with db.execute(
                    "INSERT INTO suggested_prompts (guild_id, requester_id, prompt) VALUES (?, ?, ?)",
                    (guild_id, requester_id, prompt),
                ) as cursor:
                    ids.append(int(cursor.lastrowid or 0))
            return ids

    async def suggested_prompt(self, prompt_id: int) -> str | None:
        async with self._transaction("BEGIN") as db:
            rows = list(
                await db.execute_fetchall("SELECT prompt FROM suggested_prompts WHERE id = ?", (prompt_id,))
            )
        return rows[0][0] if rows else None

    # Limits

    async def policy(self, guild_id: int, defaults: Policy) -> Policy:
        """`defaults` with this server's overrides applied and its lists added."""
        async with self._transaction("BEGIN") as db:
            rows = list(
                await db.execute_fetchall(
                    f"SELECT {', '.join(_OVERRIDE_COLUMNS)} FROM guild_settings WHERE guild_id = ?",
                    (guild_id,),
                )
            )
            lists: dict[str, frozenset[int | str]] = {}
            for name, (table, column) in _LISTS.items():
                query = f"SELECT {column} FROM {table} WHERE guild_id = ?"
                values = await db.execute_fetchall(query, (guild_id,))
                lists[name] = frozenset(value for (value,) in values)
        row = next(iter(rows), (None,) * len(_OVERRIDE_COLUMNS))
        overrides: dict[str, object] = {
            name: value for name, value in zip(_OVERRIDE_COLUMNS, row, strict=True) if value is not None
        }
        if "nsfw_only" in overrides:
            overrides["nsfw_only"] = bool(overrides["nsfw_only"])
        return dataclasses.replace(
            defaults,
            **overrides,
            allowed_channels=defaults.allowed_channels | lists["channels"],
            exempt_roles=defaults.exempt_roles | lists["roles"],
            banned_words=defaults.banned_words | lists["words"],
        )

    async def set_limits(self, guild_id: int, **values: int) -> None:
        """Override the given limits (names from SETTABLE_FIELDS) on this server; others stay as they are."""
        if not values:
            raise ValueError("Name at least one limit to set")
        for name, value in values.items():
            if name not in SETTABLE_FIELDS:
                raise ValueError(f"Unknown limit {name!r}; choose from {', '.join(SETTABLE_FIELDS)}")
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be a whole number, not {value!r}")
            low, high = (1, MAX_PROMPT_LENGTH) if name == "max_prompt_length" else (0, None)
            if value < low or (high is not None and value > high):
                bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
                raise ValueError(f"{name} must be {bounds}, not {value}")
        await self._set_columns(guild_id, values)

    async def set_nsfw_only(self, guild_id: int, nsfw_only: bool) -> None:
        await self._set_columns(guild_id, {"nsfw_only": int(nsfw_only)})

    async def set_log_channel(self, guild_id: int, channel_id: int | None) -> None:
        await self._set_columns(guild_id, {"log_channel_id": channel_id})

    async def _set_columns(self, guild_id: int, values: Mapping[str, int | None]) -> None:
        columns = ", ".join(values)  # names are checked against _OVERRIDE_COLUMNS by the callers
        updates = ", ".join(f"{name} = excluded.{name}" for name in values)
        async with self._transaction() as db:
            await db.execute(
                f"INSERT INTO guild_settings (guild_id, {columns}) VALUES (?{', ?' * len(values)}) "
                f"ON CONFLICT (guild_id) DO UPDATE SET {updates}",
                (guild_id, *values.values()),
            )

    async def reset_limits(self, guild_id: int) -> None:
        """Drop this server's overrides and lists, so the defaults apply again (usage counts stay)."""
        async with self._transaction() as db:
            await db.execute("DELETE FROM guild_settings WHERE guild_id = ?", (guild_id,))
            for table, _ in _LISTS.values():
                await db.execute(f"DELETE FROM {table} WHERE guild_id = ?", (guild_id,))

    async def add_to_list(self, guild_id: int, list_name: ListName, value: int | str) -> bool:
        """Add a channel id, role id or word (stored case-folded); False if it was already there."""
        table, column = _list_table(list_name)
        async with (
            self._transaction() as db,
            db.execute(
                f"INSERT INTO {table} (guild_id, {column}) VALUES (?, ?) ON CONFLICT DO NOTHING",
                (guild_id, _list_value(list_name, value)),
            ) as cursor,
        ):
            return cursor.rowcount > 0

    async def remove_from_list(self, guild_id: int, list_name: ListName, value: int | str) -> bool:
        """Remove a channel id, role id or word; False if it was not there."""
        table, column = _list_table(list_name)
        async with (
            self._transaction() as db,
            db.execute(
                f"DELETE FROM {table} WHERE guild_id = ? AND {column} = ?",
                (guild_id, _list_value(list_name, value)),
            ) as cursor,
        ):
            return cursor.rowcount > 0

    # Usage

    async def usage(self, guild_id: int, user_id: int, now: datetime, queued: int = 0) -> Usage:
        """What the member and the server have used on `now`'s UTC day; `queued` is passed through."""
        async with self._transaction("BEGIN") as db:
            return await _read_usage(db, guild_id, user_id, day_of(now), queued)

    async def charge(
        self,
        guild_id: int,
        user_id: int,
        kind: Kind,
        *,
        now: datetime,
        policy: Policy,
        exempt: bool,
        queued: int,
    ) -> Charge:
        """Check the limits and, if they allow it, count one `kind` request, atomically: concurrent
        charges cannot overshoot a limit. An admitted charge also starts the member's cooldown."""
        day = day_of(now)
        async with self._transaction() as db:
            usage = await _read_usage(db, guild_id, user_id, day, queued)
            place = "in direct messages" if guild_id == 0 else "on this server"
            decision = check(kind, usage, policy, now=now, exempt=exempt, place=place)
            if decision.allowed:
                await db.execute(
                    "INSERT INTO usage (guild_id, day, kind, user_id, count) VALUES (?, ?, ?, ?, 1) "
                    "ON CONFLICT (guild_id, day, kind, user_id) DO UPDATE SET count = count + 1",
                    (guild_id, day, kind, user_id),
                )
                await db.execute(
                    "INSERT INTO member_activity (guild_id, user_id, last_request_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (guild_id, user_id) "
                    "DO UPDATE SET last_request_at = excluded.last_request_at",
                    (guild_id, user_id, _stamp(now)),
                )
        log.debug("Charged %s for user %d in guild %d: %s", kind, user_id, guild_id, decision.reason or "ok")
        return Charge(decision, guild_id, user_id, kind, day, now, usage.last_request_at)

    async def refund(self, charge: Charge) -> None:
        """Give back an admitted charge on the day it was counted, once per Charge however often called."""
        if not charge.decision.allowed:
            return
        async with self._transaction() as db:
            if charge.refunded:
                return
            await db.execute(
                "UPDATE usage SET count = max(count - 1, 0) "
                "WHERE guild_id = ? AND day = ? AND kind = ? AND user_id = ?",
                (charge.guild_id, charge.day, charge.kind, charge.user_id),
            )
            # Lift the cooldown this charge started, unless a later request has started a new one.
            previous = None if charge.previous_request_at is None else _stamp(charge.previous_request_at)
            await db.execute(
                "UPDATE member_activity SET last_request_at = ? "
                "WHERE guild_id = ? AND user_id = ? AND last_request_at = ?",
                (previous, charge.guild_id, charge.user_id, _stamp(charge.charged_at)),
            )
            charge.refunded = True  # inside the lock, so a concurrent refund of this charge sees it
        log.debug("Refunded %s for user %d in guild %d", charge.kind, charge.user_id, charge.guild_id)


async def _read_usage(db: aiosqlite.Connection, guild_id: int, user_id: int, day: str, queued: int) -> Usage:
    counts = {
        kind: (server, user)
        for kind, server, user in await db.execute_fetchall(
            "SELECT kind, SUM(count), SUM(CASE WHEN user_id = ? THEN count ELSE 0 END) FROM usage "
            "WHERE guild_id = ? AND day = ? GROUP BY kind",
            (user_id, guild_id, day),
        )
    }
    rows = list(
        await db.execute_fetchall(
            "SELECT last_request_at FROM member_activity WHERE guild_id = ? AND user_id = ?",
            (guild_id, user_id),
        )
    )
    last = next((datetime.fromisoformat(at) for (at,) in rows if at is not None), None)
    server_generations, user_generations = counts.get("imagine", (0, 0))
    _, user_questions = counts.get("ask", (0, 0))
    return Usage(user_generations, user_questions, server_generations, last, queued)


def pack_tokens(tokens: Sequence[int]) -> bytes:
    """Image tokens as stored: little-endian uint32."""
    return struct.pack(f"<{len(tokens)}I", *tokens)


def unpack_tokens(data: bytes) -> tuple[int, ...]:
    return struct.unpack(f"<{len(data) // 4}I", data)


def _stamp(moment: datetime) -> str:
    """The stored form of a time: UTC ISO 8601, which round-trips exactly through fromisoformat."""
    return moment.astimezone(UTC).isoformat()


def _list_table(list_name: str) -> tuple[str, str]:
    if list_name not in _LISTS:
        raise ValueError(f"Unknown list {list_name!r}; choose from {', '.join(_LISTS)}")
    return _LISTS[list_name]


def _list_value(list_name: str, value: int | str) -> int | str:
    """Channel and role ids as ints; words case-folded with their spaces collapsed."""
    if list_name == "words":
        if not isinstance(value, str) or not value.split():
            raise ValueError(f"A banned word must be non-blank text, not {value!r}")
        return " ".join(value.casefold().split())
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"A {list_name[:-1]} id must be an int, not {value!r}")
    return value


def _statements(script: str) -> Iterator[str]:
    """Split a SQL script into statements: executescript would COMMIT the transaction a migration runs in."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer
            buffer = ""
    if buffer.strip():
        yield buffer  # an unfinished statement: executing it reports the error
