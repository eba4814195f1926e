"""UsageStore against real SQLite files in a temp dir."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bot import store as store_module
from bot.jobs import Charge
from bot.limits import Kind, Policy
from bot.store import Gallery, UsageStore

GUILD, OTHER_GUILD, USER, OTHER_USER = 10, 20, 1, 2
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
DEFAULTS = Policy(
    generations_per_user=3,
    questions_per_user=5,
    generations_per_server=100,
    cooldown_seconds=0,
    max_queued_per_user=2,
    max_prompt_length=500,
)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "usage.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[UsageStore]:
    async with UsageStore.open(db_path) as opened:
        yield opened


async def charge(
    store: UsageStore,
    kind: Kind = "imagine",
    *,
    guild: int = GUILD,
    user: int = USER,
    now: datetime = NOW,
    policy: Policy = DEFAULTS,
    exempt: bool = False,
) -> Charge:
    return await store.charge(guild, user, kind, now=now, policy=policy, exempt=exempt, queued=0)


def schema(path: Path) -> tuple[int, list[str]]:
    with sqlite3.connect(path) as db:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        tables = [name for (name,) in rows]
    return version, tables


async def test_open_creates_the_file_in_wal_mode_and_reopens_without_migrating_again(db_path: Path) -> None:
    async with UsageStore.open(db_path) as store:
        await store.set_limits(GUILD, generations_per_user=7)
    latest = store_module.load_migrations()[-1][0]
    version, tables = schema(db_path)
    assert version == latest
    assert {"guild_settings", "usage", "member_activity", "banned_words"} <= set(tables)
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    async with UsageStore.open(db_path) as store:  # re-running 0001 would fail: its tables exist
        assert (await store.policy(GUILD, DEFAULTS)).generations_per_user == 7
    assert schema(db_path) == (version, tables)


async def test_new_migrations_apply_once_and_a_failing_one_rolls_back(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = store_module.load_migrations()
    async with UsageStore.open(db_path):
        pass
    added = (shipped[-1][0] + 1, "CREATE TABLE extra (id INTEGER);\n-- trailing comment\n")
    monkeypatch.setattr(store_module, "load_migrations", lambda: [*shipped, added])
    for _ in range(2):
        async with UsageStore.open(db_path):
            pass
    assert schema(db_path)[0] == added[0]
    assert "extra" in schema(db_path)[1]

    broken = (added[0] + 1, "CREATE TABLE half (id INTEGER);\nCREATE TABLE extra (id INTEGER);\n")
    monkeypatch.setattr(store_module, "load_migrations", lambda: [*shipped, added, broken])
    with pytest.raises(sqlite3.OperationalError, match="already exists"):
        async with UsageStore.open(db_path):
            pass
    version, tables = schema(db_path)
    assert version == added[0] and "half" not in tables


async def test_overrides_change_only_the_given_limits_and_survive_reopen(db_path: Path) -> None:
    async with UsageStore.open(db_path) as store:
        await store.set_limits(GUILD, generations_per_user=0, cooldown_seconds=30)
        await store.set_limits(GUILD, max_prompt_length=200)
        await store.set_nsfw_only(GUILD, True)
        await store.set_log_channel(GUILD, 555)
    expected = dataclasses.replace(
        DEFAULTS,
        generations_per_user=0,
        cooldown_seconds=30,
        max_prompt_length=200,
        nsfw_only=True,
        log_channel_id=555,
    )
    async with UsageStore.open(db_path) as store:
        assert await store.policy(GUILD, DEFAULTS) == expected
        await store.set_log_channel(GUILD, None)
        await store.set_nsfw_only(GUILD, False)
        policy = await store.policy(GUILD, DEFAULTS)
    assert policy.log_channel_id is None and policy.nsfw_only is False


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"images_per_prompt": 2}, ValueError),
        ({"generations_per_user": -1}, ValueError),
        ({"max_prompt_length": 0}, ValueError),
        ({"max_prompt_length": 2001}, ValueError),
        ({"cooldown_seconds": 1.5}, TypeError),
        ({"cooldown_seconds": True}, TypeError),
        ({}, ValueError),
    ],
)
async def test_set_limits_rejects_bad_values(store: UsageStore, values: dict[str, int], error: type) -> None:
    with pytest.raises(error):
        await store.set_limits(GUILD, **values)
    assert await store.policy(GUILD, DEFAULTS) == DEFAULTS


async def test_lists_round_trip_and_survive_reopen(db_path: Path) -> None:
    async with UsageStore.open(db_path) as store:
        assert await store.add_to_list(GUILD, "channels", 111)
        assert await store.add_to_list(GUILD, "channels", 112)
        assert await store.add_to_list(GUILD, "roles", 222)
        assert await store.add_to_list(GUILD, "words", "  Bad   WORD ")
        assert not await store.add_to_list(GUILD, "words", "bad word")  # already there, case aside
        assert await store.remove_from_list(GUILD, "channels", 112)
        assert not await store.remove_from_list(GUILD, "channels", 112)
        with pytest.raises(ValueError):
            await store.add_to_list(GUILD, "words", "   ")
        with pytest.raises(TypeError):
            await store.add_to_list(GUILD, "roles", "222")
        with pytest.raises(ValueError):
            await store.add_to_list(GUILD, "users", 1)  # type: ignore[arg-type]
    async with UsageStore.open(db_path) as store:
        policy = await store.policy(GUILD, DEFAULTS)
    assert policy.allowed_channels == {111}
    assert policy.exempt_roles == {222}
    assert policy.banned_words == {"bad word"}


async def test_reset_limits_restores_the_defaults(store: UsageStore) -> None:
    await store.set_limits(GUILD, generations_per_user=1, max_queued_per_user=0)
    await store.set_nsfw_only(GUILD, True)
    await store.add_to_list(GUILD, "channels", 1)
    await store.add_to_list(GUILD, "roles", 2)
    await store.add_to_list(GUILD, "words", "cat")
    await charge(store)
    await store.reset_limits(GUILD)
    assert await store.policy(GUILD, DEFAULTS) == DEFAULTS
    assert (await store.usage(GUILD, USER, NOW)).user_generations == 1  # usage is not a setting


async def test_guilds_are_independent(store: UsageStore) -> None:
    await store.set_limits(GUILD, generations_per_user=1)
    await store.add_to_list(GUILD, "words", "cat")
    assert await store.policy(OTHER_GUILD, DEFAULTS) == DEFAULTS

    await charge(store, guild=GUILD)
    await charge(store, guild=GUILD, user=OTHER_USER)
    usage = await store.usage(OTHER_GUILD, USER, NOW)
    assert (usage.user_generations, usage.server_generations) == (0, 0)
    usage = await store.usage(GUILD, USER, NOW, queued=3)
    counts = (usage.user_generations, usage.user_questions, usage.server_generations, usage.queued)
    assert counts == (1, 0, 2, 3)
    assert usage.last_request_at == NOW


async def test_a_member_is_refused_at_the_daily_limit(store: UsageStore) -> None:
    results = [await charge(store) for _ in range(4)]
    assert [c.decision.allowed for c in results] == [True, True, True, False]
    assert results[-1].decision.reason.startswith("You've used 3/3 generations today")
    assert (await store.usage(GUILD, USER, NOW)).user_generations == 3  # refusals are not counted


async def test_simultaneous_charges_at_quota_minus_one_admit_exactly_one(store: UsageStore) -> None:
    for _ in range(DEFAULTS.generations_per_user - 1):
        await charge(store)
    results = await asyncio.gather(*(charge(store) for _ in range(20)))
    assert sum(c.decision.allowed for c in results) == 1
    assert (await store.usage(GUILD, USER, NOW)).user_generations == DEFAULTS.generations_per_user


async def test_simultaneous_charges_through_two_stores_on_one_file_admit_exactly_one(db_path: Path) -> None:
    async with UsageStore.open(db_path) as first, UsageStore.open(db_path) as second:
        for _ in range(DEFAULTS.generations_per_user - 1):
            await charge(first)
        results = await asyncio.gather(*(charge(s) for _ in range(10) for s in (first, second)))
        assert sum(c.decision.allowed for c in results) == 1
        assert (await second.usage(GUILD, USER, NOW)).user_generations == DEFAULTS.generations_per_user


async def test_the_server_limit_counts_every_member(store: UsageStore) -> None:
    policy = dataclasses.replace(DEFAULTS, generations_per_server=2)
    assert (await charge(store, user=1, policy=policy)).decision.allowed
    assert (await charge(store, user=2, policy=policy)).decision.allowed
    refused = await charge(store, user=3, policy=policy, exempt=True)
    assert refused.decision.reason.startswith("This server has used 2/2 generations today")


async def test_exempt_members_pass_member_limits_and_are_still_counted(store: UsageStore) -> None:
    policy = dataclasses.replace(DEFAULTS, generations_per_user=1, cooldown_seconds=3600)
    assert (await charge(store, policy=policy)).decision.allowed
    assert not (await charge(store, policy=policy)).decision.allowed
    assert (await charge(store, policy=policy, exempt=True)).decision.allowed
    usage = await store.usage(GUILD, USER, NOW)
    assert (usage.user_generations, usage.server_generations) == (2, 2)


async def test_a_new_utc_day_starts_from_zero(store: UsageStore) -> None:
    policy = dataclasses.replace(DEFAULTS, generations_per_user=1, generations_per_server=1)
    late = datetime(2024, 5, 1, 23, 59, 59, tzinfo=UTC)
    assert (await charge(store, now=late, policy=policy)).decision.allowed
    assert not (await charge(store, now=late, policy=policy)).decision.allowed
    next_day = late + timedelta(seconds=1)
    assert await store.usage(GUILD, USER, next_day) == dataclasses.replace(
        await store.usage(GUILD, USER, late), user_generations=0, server_generations=0
    )
    assert (await charge(store, now=next_day, policy=policy)).decision.allowed


async def test_cooldown_is_per_member_and_server(store: UsageStore) -> None:
    policy = dataclasses.replace(DEFAULTS, cooldown_seconds=60)
    assert (await charge(store, "ask", policy=policy)).decision.allowed
    refused = await charge(store, "imagine", now=NOW + timedelta(seconds=30), policy=policy)
    assert refused.decision.reason == "Please wait 30 s before your next request."
    assert (await charge(store, user=OTHER_USER, policy=policy)).decision.allowed
    assert (await charge(store, guild=OTHER_GUILD, policy=policy)).decision.allowed
    assert (await charge(store, now=NOW + timedelta(seconds=60), policy=policy)).decision.allowed


async def test_refund_gives_back_one_count_once(store: UsageStore) -> None:
    first, second, _ = await charge(store), await charge(store), await charge(store)
    await store.refund(first)
    await store.refund(first)
    await asyncio.gather(store.refund(second), store.refund(second))
    assert (await store.usage(GUILD, USER, NOW)).user_generations == 1
    assert first.refunded and second.refunded


async def test_refund_never_goes_below_zero_and_ignores_refusals(store: UsageStore) -> None:
    policy = dataclasses.replace(DEFAULTS, generations_per_user=1)
    admitted = await charge(store, policy=policy)
    refused = await charge(store, policy=policy)
    await store.refund(refused)
    assert (await store.usage(GUILD, USER, NOW)).user_generations == 1
    await store.refund(dataclasses.replace(admitted))  # a copy is another Charge: it refunds too
    await store.refund(admitted)
    assert (await store.usage(GUILD, USER, NOW)).user_generations == 0


async def test_refund_applies_to_the_day_of_the_charge(store: UsageStore) -> None:
    yesterday = await charge(store, "ask")
    today = NOW + timedelta(days=1)
    await charge(store, "ask", now=today)
    await store.refund(yesterday)
    assert (await store.usage(GUILD, USER, NOW)).user_questions == 0
    assert (await store.usage(GUILD, USER, today)).user_questions == 1


async def test_refund_lifts_the_cooldown_it_started(store: UsageStore) -> None:
    policy = dataclasses.replace(DEFAULTS, cooldown_seconds=60)
    earlier = NOW - timedelta(minutes=5)
    await charge(store, now=earlier, policy=policy)
    failed = await charge(store, policy=policy)
    await store.refund(failed)
    assert (await store.usage(GUILD, USER, NOW)).last_request_at == earlier
    assert (await charge(store, now=NOW + timedelta(seconds=1), policy=policy)).decision.allowed


# Galleries and suggested prompts


async def test_a_gallery_keeps_its_images_tokens_lineage_and_messages(db_path: Path) -> None:
    async with UsageStore.open(db_path) as store:
        parent = await store.save_gallery(
            Gallery(GUILD, USER, "a fox", 2, 5.0, 1.0, 7), [(1, 2, 3, 70000), (4, 5)]
        )
        child = await store.save_gallery(
            Gallery(GUILD, OTHER_USER, "a fox", 4, 5.0, 1.0, 99, keep=(4,), parent_id=parent, parent_index=1),
            [(4, 9)] * 4,
        )
        await store.add_gallery_messages(parent, 300, [31, 30])
    async with UsageStore.open(db_path) as store:  # after a restart
        assert await store.gallery(parent) == Gallery(GUILD, USER, "a fox", 2, 5.0, 1.0, 7)
        assert await store.gallery(child) == Gallery(
            GUILD, OTHER_USER, "a fox", 4, 5.0, 1.0, 99, keep=(4,), parent_id=parent, parent_index=1
        )
        assert await store.image_tokens(parent, 0) == (1, 2, 3, 70000)
        assert await store.image_tokens(parent, 1) == (4, 5)
        assert await store.image_tokens(parent, 2) is None
        assert await store.gallery_messages(parent) == [(300, 30), (300, 31)]
        assert await store.gallery_messages(child) == []


async def test_galleries_saved_before_tokens_were_kept_still_load(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = store_module.load_migrations()
    monkeypatch.setattr(store_module, "load_migrations", lambda: [m for m in shipped if m[0] <= 2])
    async with UsageStore.open(db_path):
        pass
    with sqlite3.connect(db_path) as db:  # a gallery as the schema of version 2 stored it
        db.execute(
            "INSERT INTO galleries (guild_id, requester_id, prompt, count, guidance, temperature, seed) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (GUILD, USER, "a kite", 3, 5.0, 1.0, 4),
        )
    monkeypatch.setattr(store_module, "load_migrations", lambda: shipped)
    async with UsageStore.open(db_path) as store:
        assert await store.gallery(1) == Gallery(GUILD, USER, "a kite", 3, 5.0, 1.0, 4)
        assert await store.image_tokens(1, 0) is None  # no Upscale or Vary for it: its buttons never had them


async def test_suggested_prompts_get_ids_and_survive_reopen(db_path: Path) -> None:
    async with UsageStore.open(db_path) as store:
        ids = await store.save_prompts(GUILD, USER, ["a red fox", "a blue bird"])
    async with UsageStore.open(db_path) as store:
        assert [await store.suggested_prompt(i) for i in ids] == ["a red fox", "a blue bird"]
        assert await store.suggested_prompt(max(ids) + 1) is None
