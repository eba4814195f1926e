"""A server with two members for the SimCord user stories, and readers for what the bot did in it."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, cast

import discord
import simcord
from PIL import Image
from simcord.components import walk_components

from bot.client import JanusBot

TEXT_DISPLAY = 10


@dataclass
class Scene:
    env: simcord.Env
    guild: Any  # simcord GuildHandle
    channel: Any  # simcord ChannelHandle
    alice: Any  # simcord MemberActor
    bob: Any

    @property
    def bot(self) -> JanusBot:
        """The bot under test, as its own class (SimCord types it as a plain discord.Client)."""
        return cast(JanusBot, self.env.bot)

    @property
    def mention(self) -> str:
        assert self.env.bot.user is not None  # logged in
        return self.env.bot.user.mention

    def bot_messages(self, channel: Any = None) -> list[discord.Message]:
        """The bot's public messages in `channel` (default: the scene's), oldest first."""
        assert self.env.bot.user is not None
        me = self.env.bot.user.id
        return [m for m in (channel or self.channel).history() if m.author.id == me]

    def bodies(self, method: str | None = None, path_part: str = "") -> list[dict]:
        """JSON bodies of the bot's REST calls, in order (optionally one method, path containing
        `path_part`)."""
        return [
            e.json
            for e in self.env.http_requests
            if isinstance(e.json, dict) and (method is None or e.method == method) and path_part in e.path
        ]

    def contents(self, method: str | None = None) -> list[str]:
        """Every message text the bot sent or edited in, in order (a V2 message's text displays, one
        per line)."""
        texts = []
        for body in self.bodies(method):
            if isinstance(body.get("content"), str):
                texts.append(body["content"])
            if displays := text_displays(body.get("components") or []):
                texts.append(displays)
        return texts


def open_scene(env: simcord.Env) -> Scene:
    guild = env.create_guild()
    channel = guild.create_text_channel("general")
    return Scene(
        env,
        guild,
        channel,
        guild.add_member(env.create_user("alice")),
        guild.add_member(env.create_user("bob")),
    )


def text_displays(components: list[dict]) -> str:
    return "\n".join(c["content"] for c in walk_components(components) if c.get("type") == TEXT_DISPLAY)


def text_of(message: Any) -> str:
    """What a member reads in a message (a discord.Message or SimCord's ResponseMessage): its content, or the
    text displays of a Components V2 message, one per line."""
    message = message if isinstance(message, discord.Message) else message.message
    if not message.flags.components_v2:
        return message.content
    return text_displays([component.to_dict() for component in message.components])


def components_of(message: Any) -> list[dict]:
    """Every component of a message, nested ones included, as Discord's JSON."""
    message = message if isinstance(message, discord.Message) else message.message
    return list(walk_components([component.to_dict() for component in message.components]))


def labels(message: Any) -> list[str]:
    """The labels of a message's buttons and the placeholders of its select menus, in order."""
    return [
        c.get("label") or c.get("placeholder") or "" for c in components_of(message) if c["type"] in (2, 3)
    ]


async def decode(attachment: discord.Attachment) -> Image.Image:
    """The attachment's bytes decoded as an image (PIL checks the format, not the file name)."""
    image = Image.open(io.BytesIO(await attachment.read()))
    image.load()
    return image
