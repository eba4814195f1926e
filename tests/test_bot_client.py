"""The client (bot/client.py) through SimCord: REST calls follow DISCORD_API_BASE, the cogs' commands are
synced
(to DEV_GUILD_ID too), message content is asked for, and the client shards itself."""

from __future__ import annotations

import discord
import discord.gateway
import discord.http
import simcord
from discord.ext import commands
from scene import open_scene

from bot.client import JanusBot, make_intents
from bot.executor import GpuExecutor

BASE = "http://127.0.0.1:9999/api/v10"


async def test_every_rest_call_goes_to_discord_api_base(make_bot, monkeypatch):
    seen: list[tuple[str, str]] = []
    build_route = discord.http.Route.__init__

    def spy(self, *args, **kwargs) -> None:
        build_route(self, *args, **kwargs)
        seen.append((self.method, self.url))

    monkeypatch.setattr(discord.http.Route, "__init__", spy)  # every REST and webhook call builds a Route
    bot = await make_bot(discord_api_base=BASE, max_answer_tokens=4)  # before start: login and sync count too

    async with simcord.run(bot, settle_timeout=60) as env:
        scene = open_scene(env)
        await scene.alice.send(scene.channel, f"{scene.mention} hello")
        await scene.alice.slash(scene.channel, "imagine", prompt="a cat", count=1, seed=1)

    paths = [url.removeprefix(BASE) for _method, url in seen]
    for expected in (
        "/oauth2/applications/@me",
        "/commands",
        "/typing",
        "/messages",
        "/callback",
        "@original",
    ):
        assert any(path.endswith(expected) for path in paths), expected
    assert all(url.startswith(BASE + "/") for _method, url in seen)


async def test_commands_are_synced_globally_and_to_the_dev_guild(make_bot):
    dev_guild_id = 4242
    bot = await make_bot(dev_guild_id=dev_guild_id)
    env = simcord.Env(bot, settle_timeout=60)
    guild = env.create_guild(id=dev_guild_id)  # the dev guild must exist before the bot syncs to it
    await env.start()
    try:
        syncs = [e.path for e in env.http_requests if e.method == "PUT" and e.path.endswith("/commands")]
        assert len(syncs) == 2 and syncs[1].endswith(f"/guilds/{dev_guild_id}/commands")
        alice = guild.add_member(env.create_user("alice"))
        assert {"imagine", "describe"} <= set(alice.available_commands(guild.create_text_channel("general")))
    finally:
        await env.shutdown()
    env.raise_errors()


async def test_the_client_reads_message_content_and_shards_itself(settings, monkeypatch):
    monkeypatch.setattr(
        discord.http.Route, "BASE", discord.http.Route.BASE
    )  # the bot sets it; restore it after
    assert make_intents().message_content
    assert issubclass(JanusBot, commands.AutoShardedBot)
    # `python -m bot` gives no shard count, so discord.py asks Discord (GET /gateway/bot) how many it needs.
    bot = JanusBot(settings=settings, store=None, executor=GpuExecutor())  # type: ignore[arg-type]
    assert bot.shard_count is None and bot.intents.message_content


async def test_the_gateway_follows_discord_gateway_url(make_bot, monkeypatch):
    """Auto-sharding asks GET /gateway/bot for the shard count; the URL it connects to is
    DISCORD_GATEWAY_URL."""
    gateway = "ws://127.0.0.1:9998/gateway"

    async def discord_answer(self) -> tuple[int, str, dict]:
        return 3, "wss://gateway.discord.gg", {"total": 1000}

    monkeypatch.setattr(discord.http.HTTPClient, "get_bot_gateway", discord_answer)
    monkeypatch.setattr(
        discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    )
    bot = await make_bot(discord_gateway_url=gateway)
    shards, url, _limits = await bot.http.get_bot_gateway()
    assert (shards, url) == (3, gateway)
    assert str(discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY) == gateway  # reconnects without a resume URL


async def test_without_discord_gateway_url_the_reported_gateway_is_used(make_bot, monkeypatch):
    async def discord_answer(self) -> tuple[int, str, dict]:
        return 1, "wss://gateway.discord.gg", {"total": 1000}

    monkeypatch.setattr(discord.http.HTTPClient, "get_bot_gateway", discord_answer)
    bot = await make_bot()
    assert (await bot.http.get_bot_gateway())[1] == "wss://gateway.discord.gg"
