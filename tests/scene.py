"""A server with two members for the SimCord user stories, and readers for what the bot did in it."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import discord
import simcord
from PIL import Image


@dataclass
class Scene:
    env: simcord.Env
    guild: Any  # simcord GuildHandle
    channel: Any  # simcord ChannelHandle
    alice: Any  # simcord MemberActor
    bob: Any

    @property
    def mention(self) -> str:
        return self.env.bot.user.mention

    def bot_messages(self, channel: Any = None) -> list[discord.Message]:
        """The bot's public messages in `channel` (default: the scene's), oldest first."""
        me = self.env.bot.user.id
        return [m for m in (channel or self.channel).history() if m.author.id == me]

    def bodies(self, method: str | None = None, path_part: str = "") -> list[dict]:
        """JSON bodies of the bot's REST calls, in order (optionally one method, path containing `path_part`)."""
        return [e.json for e in self.env.http_requests
                if isinstance(e.json, dict) and (method is None or e.method == method) and path_part in e.path]

    def contents(self, method: str | None = None) -> list[str]:
        """Every message text the bot sent or edited in, in order."""
        return [b["content"] for b in self.bodies(method) if isinstance(b.get("content"), str)]


def open_scene(env: simcord.Env) -> Scene:
    guild = env.create_guild()
    channel = guild.create_text_channel("general")
    return Scene(env, guild, channel, guild.add_member(env.create_user("alice")),
                 guild.add_member(env.create_user("bob")))


async def decode(attachment: discord.Attachment) -> Image.Image:
    """The attachment's bytes decoded as an image (PIL checks the format, not the file name)."""
    image = Image.open(io.BytesIO(await attachment.read()))
    image.load()
    return image
