"""Per-server usage limits as admins and members meet them: user stories through SimCord and the tiny models.

SimCord's clock starts at 2026-01-01 00:00 UTC, so a fresh day "resets in 24 h"; `env.advance_time` moves it.
Every /imagine asks for one image and every answer is at most 8 tokens, to keep the file fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import discord
import pytest
import simcord
from discord import app_commands
from scene import text_of

from bot.client import SORRY, JanusBot
from bot.errors import JobFailed, QuotaExceeded
from bot.executor import GpuExecutor
from bot.jobs import Charge

LIMIT = 10.0  # seconds any test-side wait may take before the test fails
SERVER_ONLY = "I only work in servers, not in direct messages."
MANAGERS_ONLY = "Only members with the Manage Server permission can change limits."
# The keys `GuildHandle.create_text_channel(overwrites=...)` takes.
Overwrites: TypeAlias = dict[
    simcord.RoleHandle
    | simcord.MemberActor
    | simcord.UserHandle
    | discord.Role
    | discord.Member
    | discord.User
    | discord.ClientUser,
    discord.PermissionOverwrite,
]


@pytest.fixture
def bot_settings() -> dict[str, Any]:
    """Settings overrides for this test's bot; a test picks others with `with_settings(...)`."""
    return {}


def with_settings(**overrides: Any) -> pytest.MarkDecorator:
    label = ",".join(f"{name}={value}" for name, value in overrides.items())
    return pytest.mark.parametrize("bot_settings", [overrides], ids=[label])


@pytest.fixture
async def simcord_bot(make_bot, bot_settings: dict[str, Any]) -> JanusBot:
    return await make_bot(**{"max_answer_tokens": 8, **bot_settings})


def janus(env: simcord.Env) -> JanusBot:
    """The bot under test, as the `JanusBot` it is."""
    assert isinstance(env.bot, JanusBot)
    return env.bot


def bot_user(env: simcord.Env) -> discord.ClientUser:
    """The bot's own user (set once it has logged in)."""
    assert env.bot.user is not None
    return env.bot.user


@dataclasses.dataclass
class Server:
    """A server with #general, an admin (role `managers`: Manage Server) and a plain member, alice."""

    env: simcord.Env
    guild: simcord.GuildHandle
    general: simcord.ChannelHandle
    managers: simcord.RoleHandle
    admin: simcord.MemberActor
    alice: simcord.MemberActor

    async def limits(self, command: str, **options: Any) -> str:
        """The admin runs `/limits <command>`; returns the private answer."""
        return private(await self.admin.slash(self.general, f"limits {command}", **options))

    async def ask(
        self, member: simcord.MemberActor, question: str, channel: simcord.ChannelHandle | None = None
    ) -> discord.Message:
        """`member` mentions the bot with a question; returns the bot's reply to it."""
        channel = channel or self.general
        asked = await member.send(channel, f"{bot_user(self.env).mention} {question}")
        replies = [m for m in channel.history() if m.reference and m.reference.message_id == asked.id]
        assert len(replies) == 1 and replies[0].author.id == bot_user(self.env).id
        return replies[0]


def open_server(
    env: simcord.Env, name: str = "Janus Fans", *, alice: simcord.UserHandle | None = None
) -> Server:
    guild = env.create_guild(name)
    general = guild.create_text_channel("general")
    managers = guild.create_role("managers", permissions=discord.Permissions(manage_guild=True))
    admin = guild.add_member(env.create_user(f"{name} admin"), roles=[managers])
    member = guild.add_member(alice or env.create_user("alice"))
    return Server(env, guild, general, managers, admin, member)


async def imagine(
    member: simcord.MemberActor, channel: simcord.ChannelHandle, prompt: str = "a lighthouse at dusk"
) -> simcord.InteractionResult:
    return await member.slash(channel, "imagine", prompt=prompt, count=1)


def drew(result: simcord.InteractionResult) -> bool:
    """The /imagine answer is a public gallery of one image."""
    return not result.ephemeral and result.response is not None and len(result.response.attachments) == 1


def private(result: simcord.InteractionResult) -> str:
    """The text of an answer only the member sees."""
    assert result.ephemeral, result.response and result.response.content
    assert result.response is not None
    return result.response.content


async def usage(member: simcord.MemberActor, channel: simcord.ChannelHandle) -> str:
    return private(await member.slash(channel, "usage"))


@contextlib.asynccontextmanager
async def gpu_held(
    executor: GpuExecutor, *, waiting: int = 0, owner: int | None = None
) -> AsyncIterator[None]:
    """Hold the GPU thread with a job until the block ends, with `waiting` more jobs (of `owner`) behind it.

    The test queues them, outside the bot's work, so SimCord does not wait for them to finish."""
    started, release = threading.Event(), threading.Event()

    def hold(_report: Any) -> None:
        started.set()
        release.wait(LIMIT)

    jobs = [executor.submit(hold, kind="held")]
    try:
        assert await asyncio.to_thread(started.wait, LIMIT), "the GPU thread never took the holding job"
        jobs += [executor.submit(lambda _report: None, kind="held", owner=owner) for _ in range(waiting)]
        yield
    finally:
        release.set()
        await asyncio.wait_for(asyncio.gather(*(job.future for job in jobs)), LIMIT)


# ---- an admin sets a limit; members meet it --------------------------------------------------------------


async def test_admin_sets_a_limit_and_a_member_hits_it_with_the_numbers(simcord_env: simcord.Env) -> None:
    server = open_server(simcord_env)
    answer = await server.limits("set", generations_per_user=1)
    assert answer.startswith("Updated.") and "`generations_per_user`: 1 (changed)" in answer

    assert drew(await imagine(server.alice, server.general))
    await simcord_env.advance_time(90)  # 00:01:30 UTC
    second = await imagine(server.alice, server.general)
    assert private(second) == "You've used 1/1 generations today on this server; resets in 23 h 59 min."


async def test_a_plain_member_cannot_change_limits(simcord_env: simcord.Env) -> None:
    server = open_server(simcord_env)
    assert "limits set" not in server.alice.available_commands(server.general)
    with pytest.raises(simcord.SetupError, match="default-member-permissions"):
        await server.alice.slash(server.general, "limits set", generations_per_user=1000)

    # A server admin grants the command to everyone; the bot still checks who may change limits.
    commands = await janus(simcord_env).tree.fetch_commands()
    limits = next(command for command in commands if command.name == "limits")
    server.guild.set_command_permissions(limits, {server.guild.default_role: True})
    for command, options in (
        ("set", {"generations_per_user": 1000}),
        ("reset", {}),
        ("banned-word remove", {"word": "cat"}),
        ("log", {}),
    ):
        refused = await server.alice.slash(server.general, f"limits {command}", **options)
        assert private(refused) == MANAGERS_ONLY
    # SimCord records what reaches the bot's error handler only when it wraps it; then these refusals are all
    assert all(isinstance(error, app_commands.CheckFailure) for error in simcord_env.errors)
    assert "Generations: 0/20 used" in await usage(server.alice, server.general)

    # Administrator alone is enough, and so is owning the server.
    admins = server.guild.create_role("admins", permissions=discord.Permissions(administrator=True))
    bob = server.guild.add_member(simcord_env.create_user("bob"), roles=[admins])
    owner = server.guild.add_member(server.guild.owner)
    for member, value in ((bob, 7), (owner, 8)):
        answer = private(await member.slash(server.general, "limits set", generations_per_user=value))
        assert answer.startswith("Updated.")
    assert "Generations: 0/8 used" in await usage(server.alice, server.general)


async def test_show_reset_and_usage(simcord_env: simcord.Env) -> None:
    server = open_server(simcord_env)
    await server.limits("set", generations_per_user=3, questions_per_user=4, cooldown_seconds=30)
    assert drew(await imagine(server.alice, server.general))

    shown = await server.limits("show")
    for line in (
        "`generations_per_user`: 3 (changed)",
        "`questions_per_user`: 4 (changed)",
        "`generations_per_server`: 500\n",
        "`cooldown_seconds`: 30 s (changed)",
        "Today: 1/500 generations on this server.",
        "resets in 24 h",
    ):
        assert line in shown

    assert await usage(server.alice, server.general) == (
        "**Your usage today on this server**\n"
        "Generations: 1/3 used, 2 left\n"
        "Questions: 0/4 used, 4 left\n"
        "The server has used 1/500 generations today.\n"
        "Resets in 24 h (midnight UTC)."
    )

    back = await server.limits("reset")
    assert back.startswith("Back to the defaults.") and "(changed)" not in back
    assert "`generations_per_user`: 20\n" in back and "`cooldown_seconds`: 0 s\n" in back
    assert "Generations: 1/20 used, 19 left" in await usage(server.alice, server.general)  # usage stays


async def test_questions_per_user_refusal_is_a_reply(simcord_env: simcord.Env) -> None:
    server = open_server(simcord_env)
    await server.limits("set", questions_per_user=1)
    await simcord_env.advance_time(3600)
    first = await server.ask(server.alice, "what is a lighthouse?")
    assert "You've used" not in first.content
    second = await server.ask(server.alice, "and a harbour?")
    assert second.content == "You've used 1/1 questions today on this server; resets in 23 h."
    assert "Questions: 1/1 used, 0 left" in await usage(server.alice, server.general)


async def test_server_wide_limit_cooldown_prompt_length_and_off(simcord_env: simcord.Env) -> None:
    server = open_server(simcord_env)
    bob = server.guild.add_member(simcord_env.create_user("bob"))
    await server.limits("set", generations_per_server=1, cooldown_seconds=60, max_prompt_length=20)

    too_long = await imagine(server.alice, server.general, "a lighthouse at dusk, in oils")
    assert private(too_long) == (
        "That's 29 characters; the limit here is 20. Please shorten it and try again."
    )
    assert drew(await imagine(server.alice, server.general))
    assert private(await imagine(bob, server.general)) == (
        "This server has used 1/1 generations today; resets in 24 h."
    )

    await server.limits("set", generations_per_server=100)
    too_soon = await imagine(server.alice, server.general)
    assert private(too_soon) == "Please wait 1 min before your next request."
    await simcord_env.advance_time(60)
    assert drew(await imagine(server.alice, server.general))

    await server.limits("set", generations_per_user=0)
    assert private(await imagine(bob, server.general)) == "Image generation is turned off on this server."
    assert "Generations: turned off here" in await usage(bob, server.general)


# ---- servers, restarts, concurrency, days ----------------------------------------------------------------


async def test_two_servers_are_independent(simcord_env: simcord.Env) -> None:
    alice = simcord_env.create_user("alice")
    strict = open_server(simcord_env, "Strict", alice=alice)
    relaxed = open_server(simcord_env, "Relaxed", alice=alice)
    await strict.limits("set", generations_per_user=1)
    await strict.limits("banned-word add", word="harbour")

    assert drew(await imagine(strict.alice, strict.general))
    assert private(await imagine(strict.alice, strict.general)).startswith("You've used 1/1 generations")
    assert drew(await imagine(relaxed.alice, relaxed.general, "a harbour"))
    assert drew(await imagine(relaxed.alice, relaxed.general))

    assert "Generations: 2/20 used" in await usage(relaxed.alice, relaxed.general)
    assert "Generations: 1/1 used" in await usage(strict.alice, strict.general)
    shown = await relaxed.limits("show")
    assert "(changed)" not in shown and "Banned words: none" in shown and "Today: 2/500" in shown


async def test_limits_and_usage_survive_a_restart(simcord_env: simcord.Env, make_bot) -> None:
    server = open_server(simcord_env)
    await server.limits("set", generations_per_user=2)
    await server.limits("banned-word add", word="harbour")
    assert drew(await imagine(server.alice, server.general))

    await simcord_env.restart_bot(await make_bot(max_answer_tokens=8))

    assert "Generations: 1/2 used, 1 left" in await usage(server.alice, server.general)
    refused = await imagine(server.alice, server.general, "a harbour")
    assert private(refused) == "That contains “harbour”, which this server doesn't allow."
    assert drew(await imagine(server.alice, server.general))
    assert private(await imagine(server.alice, server.general)).startswith("You've used 2/2 generations")


async def test_simultaneous_requests_at_quota_minus_one_admit_one(simcord_env: simcord.Env) -> None:
    server = open_server(simcord_env)
    await server.limits("set", generations_per_user=3)
    for _ in range(2):
        assert drew(await imagine(server.alice, server.general))

    bot = janus(simcord_env)
    guild = bot.get_guild(server.guild.id)
    assert guild is not None
    channel, member = guild.get_channel(server.general.id), await guild.fetch_member(server.alice.id)
    assert isinstance(channel, discord.TextChannel)
    admit = bot.quota.admit
    outcomes = await asyncio.gather(
        *(admit("imagine", guild=guild, channel=channel, user=member, text="a cat") for _ in range(8)),
        return_exceptions=True,
    )
    assert sum(isinstance(outcome, Charge) for outcome in outcomes) == 1
    refusals = [outcome for outcome in outcomes if not isinstance(outcome, Charge)]
    assert len(refusals) == 7 and all(isinstance(refusal, QuotaExceeded) for refusal in refusals)
    assert str(refusals[0]) == "You've used 3/3 generations today on this server; resets in 24 h."
    assert "Generations: 3/3 used, 0 left" in await usage(server.alice, server.general)


async def test_simultaneous_requests_cannot_overfill_a_members_queue(simcord_env: simcord.Env) -> None:
    server = open_server(simcord_env)
    await server.limits("set", max_queued_per_user=1)
    bot = janus(simcord_env)
    guild = bot.get_guild(server.guild.id)
    assert guild is not None
    channel, member = guild.get_channel(server.general.id), await guild.fetch_member(server.alice.id)
    assert isinstance(channel, discord.TextChannel)

    async def request() -> Charge:
        """What /imagine does: admit, then queue the job, which from then on counts instead of the
        admission."""
        charge = await bot.quota.admit("imagine", guild=guild, channel=channel, user=member, text="a cat")
        await asyncio.sleep(0)  # the others are admitted meanwhile (a cog acknowledges, downloads, ...)
        bot.executor.submit(lambda _report: None, kind="imagine", owner=member.id)
        bot.quota.queued(charge)
        return charge

    async with gpu_held(bot.executor):
        outcomes = await asyncio.gather(*(request() for _ in range(4)), return_exceptions=True)
    assert sum(isinstance(outcome, Charge) for outcome in outcomes) == 1
    assert {str(outcome) for outcome in outcomes if not isinstance(outcome, Charge)} == {
        "You already have 1 request waiting; please wait for it to finish."
    }


async def test_the_day_rolls_over_at_midnight_utc(simcord_env: simcord.Env) -> None:
    server = open_server(simcord_env)
    await server.limits("set", generations_per_user=1)
    await simcord_env.advance_time(23 * 3600 + 59 * 60)  # 23:59 UTC
    assert drew(await imagine(server.alice, server.general))
    assert private(await imagine(server.alice, server.general)) == (
        "You've used 1/1 generations today on this server; resets in 1 min."
    )

    await simcord_env.advance_time(60)  # midnight
    assert "Generations: 0/1 used, 1 left" in await usage(server.alice, server.general)
    assert drew(await imagine(server.alice, server.general))


# ---- refunds ---------------------------------------------------------------------------------------------


@with_settings(queue_size=1)
async def test_requests_refused_by_a_full_queue_are_not_charged(simcord_env: simcord.Env) -> None:
    server = open_server(simcord_env)
    async with gpu_held(janus(simcord_env).executor, waiting=1):
        refused = await imagine(server.alice, server.general)
        assert private(refused).endswith("already waiting. Please try again in a minute.")
        reply = await server.ask(server.alice, "what is a lighthouse?")
        assert reply.content.endswith("already waiting. Please try again in a minute.")
    assert "Generations: 0/20 used" in (text := await usage(server.alice, server.general))
    assert "Questions: 0/50 used" in text
    assert drew(await imagine(server.alice, server.general))


class FailingStudio:
    """The real studio, except that drawing fails with `error`."""

    def __init__(self, studio: Any, error: Exception) -> None:
        self.studio, self.error = studio, error

    def __getattr__(self, name: str) -> Any:
        return getattr(self.studio, name)

    def imagine_batch(self, requests: list[Any], reports: list[Any]) -> list[Any]:
        raise self.error


async def test_a_failed_generation_is_refunded(
    simcord_env: simcord.Env, caplog: pytest.LogCaptureFixture
) -> None:
    server = open_server(simcord_env)
    bot = janus(simcord_env)
    studio = bot.studio
    await server.limits("set", generations_per_user=1, cooldown_seconds=600)

    bot.studio = FailingStudio(studio, JobFailed("The GPU ran out of memory for this request."))
    told = await imagine(server.alice, server.general)
    assert text_of(told.response) == "⚠️ The GPU ran out of memory for this request."
    assert "Generations: 0/1 used" in await usage(server.alice, server.general)

    bot.studio = FailingStudio(studio, RuntimeError("the model fell over"))
    told = await imagine(server.alice, server.general)
    assert text_of(told.response) == f"⚠️ {SORRY}"
    logged = [record.exc_info[1] for record in caplog.records if record.exc_info]
    assert any("the model fell over" in str(error) for error in logged)
    captured = [getattr(error, "original", error) for error in simcord_env.errors]  # see test above
    assert all("the model fell over" in str(error) for error in captured)
    assert "Generations: 0/1 used" in await usage(server.alice, server.general)

    bot.studio = studio  # the refunds also lifted the cooldown each failed request had started
    assert drew(await imagine(server.alice, server.general))


async def test_max_queued_per_user(simcord_env: simcord.Env) -> None:
    server = open_server(simcord_env)
    await server.limits("set", max_queued_per_user=1)
    async with gpu_held(janus(simcord_env).executor, waiting=1, owner=server.alice.id):  # her earlier request
        refused = await imagine(server.alice, server.general)
        assert private(refused) == "You already have 1 request waiting; please wait for it to finish."
    assert "Generations: 0/20 used" in await usage(server.alice, server.general)
    assert drew(await imagine(server.alice, server.general))


# ---- what the server's lists and switches do -------------------------------------------------------------


async def test_banned_words_are_whole_words_in_any_case(simcord_env: simcord.Env) -> None:
    server = open_server(simcord_env)
    assert (await server.limits("banned-word add", word="Cat")).startswith("Updated.")

    refused = await imagine(server.alice, server.general, "a CAT sleeping")
    assert private(refused) == "That contains “cat”, which this server doesn't allow."
    assert (await server.ask(server.alice, "is a cat a pet?")).content == (
        "That contains “cat”, which this server doesn't allow."
    )
    assert drew(await imagine(server.alice, server.general, "category theory as a painting"))
    assert "Generations: 1/20 used" in await usage(server.alice, server.general)

    await server.limits("banned-word remove", word="cat")
    assert drew(await imagine(server.alice, server.general, "a CAT sleeping"))


async def test_channel_allow_list(simcord_env: simcord.Env) -> None:
    server = open_server(simcord_env)
    art = server.guild.create_text_channel("art")
    assert f"Channels: {art.mention}" in await server.limits("channel add", channel=art)

    refused = f"I'm not enabled in this channel on this server; try {art.mention}."
    assert private(await imagine(server.alice, server.general)) == refused
    assert (await server.ask(server.alice, "what is a lighthouse?")).content == refused
    assert drew(await imagine(server.alice, art))
    assert "Generations: 1/20 used" in await usage(server.alice, server.general)

    await server.limits("channel remove", channel=art)
    assert drew(await imagine(server.alice, server.general))


async def test_exempt_roles_pass_the_member_limits(simcord_env: simcord.Env) -> None:
    server = open_server(simcord_env)
    artists = server.guild.create_role("artists")
    bob = server.guild.add_member(simcord_env.create_user("bob"), roles=[artists])
    await server.limits("set", generations_per_user=1)
    assert f"Exempt roles: {artists.mention}" in await server.limits("exempt-role add", role=artists)

    for member in (server.alice, bob):
        assert drew(await imagine(member, server.general))
    assert private(await imagine(server.alice, server.general)).startswith("You've used 1/1 generations")
    assert drew(await imagine(bob, server.general))
    assert "Your role frees you from the member limits." in await usage(bob, server.general)

    await server.limits("exempt-role remove", role=artists)
    assert private(await imagine(bob, server.general)).startswith("You've used 2/1 generations")


async def test_nsfw_only(simcord_env: simcord.Env, monkeypatch: pytest.MonkeyPatch) -> None:
    server = open_server(simcord_env)
    adults = server.guild.create_text_channel("adults")
    # SimCord does not model age-restricted channels
    monkeypatch.setattr(discord.TextChannel, "is_nsfw", lambda channel: channel.id == adults.id)
    assert "age-restricted channels: yes" in await server.limits("nsfw-only", enabled=True)

    assert private(await imagine(server.alice, server.general)) == (
        "On this server, /imagine works only in age-restricted (NSFW) channels."
    )
    assert drew(await imagine(server.alice, adults))
    await server.ask(server.alice, "what is a lighthouse?")  # questions are fine anywhere
    assert "Questions: 1/50 used" in await usage(server.alice, server.general)

    assert "age-restricted channels: no" in await server.limits("nsfw-only", enabled=False)
    assert drew(await imagine(server.alice, server.general))


async def test_the_moderation_log_gets_every_generation_and_question(simcord_env: simcord.Env) -> None:
    server = open_server(simcord_env)
    hidden, shown = (
        discord.PermissionOverwrite(view_channel=False),
        discord.PermissionOverwrite(view_channel=True),
    )
    moderators_only: Overwrites = {server.guild.default_role: hidden, server.managers: shown}
    closed = server.guild.create_text_channel("mod-only", overwrites=moderators_only)
    assert await server.limits("log", channel=closed) == (
        f"I can't post in {closed.mention}: please give me View Channel, Send Messages, Attach Files there, "
        "then run this again."
    )
    with_the_bot = {**moderators_only, bot_user(simcord_env): shown}
    mod_log = server.guild.create_text_channel("mod-log", overwrites=with_the_bot)
    assert f"Moderation log: {mod_log.mention}" in await server.limits("log", channel=mod_log)

    drawn = await imagine(server.alice, server.general, "a red fox")
    assert drew(drawn)
    entry = mod_log.last_message
    assert entry is not None
    assert entry.content.startswith(
        f"**/imagine** by {server.alice.mention} (`{server.alice.id}`) in "
        f"{server.general.mention}\n> a red fox\n"
    )
    assert drawn.response is not None
    assert entry.content.endswith(f"Result: {drawn.response.message.jump_url}")
    assert len(entry.attachments) == 1

    answer = await server.ask(server.alice, "what does a fox eat?")
    entry = mod_log.last_message
    assert entry is not None
    assert entry.content.startswith(
        f"**question** by {server.alice.mention} (`{server.alice.id}`) in "
        f"{server.general.mention}\n> what does a fox eat?\nAnswer: "
    )
    assert discord.utils.escape_markdown(answer.content) in entry.content
    assert len(mod_log.history()) == 2

    assert "Moderation log: off" in await server.limits("log")
    assert drew(await imagine(server.alice, server.general))
    assert len(mod_log.history()) == 2


# ---- direct messages -------------------------------------------------------------------------------------


@with_settings(allow_dms=True, generations_per_user=1)
async def test_dms_work_when_allowed_under_the_default_limits(simcord_env: simcord.Env) -> None:
    server = open_server(simcord_env)
    await server.limits("set", generations_per_user=5)  # a server's overrides do not reach DMs
    dan = simcord_env.create_user("dan")
    await dan.send_dm("what is a lighthouse?")
    question, reply = dan.dm_channel.history()
    assert reply.reference is not None
    assert reply.author.id == bot_user(simcord_env).id and reply.reference.message_id == question.id

    first = await dan.slash("imagine", prompt="a lighthouse", count=1)
    assert not first.ephemeral and len(first.response.attachments) == 1
    second = await dan.slash("imagine", prompt="a lighthouse", count=1)
    assert private(second) == "You've used 1/1 generations today in direct messages; resets in 24 h."
    assert "Generations: 1/1 used, 0 left" in private(await dan.slash("usage"))


async def test_dm_slash_commands_are_not_offered_when_dms_are_off(simcord_env: simcord.Env) -> None:
    dan = simcord_env.create_user("dan")
    assert dan.available_commands() == ()  # Discord shows none of them in the bot's DMs
    with pytest.raises(simcord.SetupError, match="not visible"):
        await dan.slash("imagine", prompt="a lighthouse", count=1)


async def test_dm_messages_are_politely_refused_when_dms_are_off(simcord_env: simcord.Env) -> None:
    dan = simcord_env.create_user("dan")
    await dan.send_dm("what is a lighthouse?")
    assert [message.content for message in dan.dm_channel.history()][-1] == SERVER_ONLY
