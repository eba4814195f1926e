"""/status for a server's admins: what the bot and its GPU are doing."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.client import reply_privately
from bot.places import SERVER_CHANNELS, pin
from bot.status import current, render

if TYPE_CHECKING:
    from bot.client import JanusBot


class Status(commands.Cog):
    """Model, device, queue and timings at a glance."""

    def __init__(self, bot: JanusBot) -> None:
        self.bot = bot
        pin(self.status, contexts=SERVER_CHANNELS)  # the bot's own state, for a server's admins

    @app_commands.command()
    @app_commands.default_permissions(manage_guild=True)
    async def status(self, interaction: discord.Interaction) -> None:
        """Show the model, queue, timings and GPU memory."""
        await reply_privately(interaction, render(await current(self.bot)))


async def setup(bot: JanusBot) -> None:
    await bot.add_cog(Status(bot))
