"""/limits for a server's admins (Manage Server), and /usage for everyone."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.client import reply_privately
from bot.limits import Policy, format_duration, resets_in
from bot.media import quote
from bot.places import SERVER_CHANNELS, member_contexts, pin

if TYPE_CHECKING:
    from bot.client import JanusBot
    from bot.store import ListName

Count = app_commands.Range[int, 0, 1_000_000]
LOG_PERMISSIONS = ("view_channel", "send_messages", "attach_files")  # to post in the moderation log


class ManagersOnly(app_commands.Group):
    """A command group for members who can manage the server, checked on the bot's side too, since server
    admins can grant the command itself to anyone."""

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        permissions = interaction.permissions
        if interaction.guild is None or not (permissions.manage_guild or permissions.administrator):
            raise app_commands.CheckFailure(
                "Only members with the Manage Server permission can change limits."
            )
        return True


class Admin(commands.Cog):
    """Per-server limits, moderated by each server's own admins."""

    limits = ManagersOnly(
        name="limits",
        description="This server's usage limits",
        guild_only=True,
        default_permissions=discord.Permissions(manage_guild=True),
    )
    channels = ManagersOnly(
        name="channel", description="Channels where the bot answers (none = all)", parent=limits
    )
    roles = ManagersOnly(name="exempt-role", description="Roles free of the member limits", parent=limits)
    words = ManagersOnly(name="banned-word", description="Words refused in prompts", parent=limits)

    def __init__(self, bot: JanusBot) -> None:
        self.bot = bot
        pin(self.limits, contexts=SERVER_CHANNELS)
        pin(self.usage, contexts=member_contexts(bot.settings.allow_dms))

    async def policy(self, guild: discord.Guild) -> Policy:
        return await self.bot.quota.policy(guild)

    async def show_limits(self, interaction: discord.Interaction, note: str = "") -> None:
        assert interaction.guild is not None
        policy = await self.policy(interaction.guild)
        defaults = self.bot.quota.defaults
        usage = await self.bot.store.usage(interaction.guild.id, interaction.user.id, discord.utils.utcnow())

        def line(name: str, value: int, unit: str = "") -> str:
            marker = "" if value == getattr(defaults, name) else " (changed)"
            shown = "off" if value == 0 and name != "cooldown_seconds" else f"{value}{unit}"
            return f"`{name}`: {shown}{marker}"

        channels = ", ".join(f"<#{c}>" for c in sorted(policy.allowed_channels)) or "all channels"
        roles = ", ".join(f"<@&{r}>" for r in sorted(policy.exempt_roles)) or "none"
        words = ", ".join(f"`{quote(w, 40)}`" for w in sorted(policy.banned_words)) or "none"
        text = "\n".join(
            [
                f"{note}\n" if note else "",
                f"**Limits on {quote(interaction.guild.name, 100)}** (per UTC day; resets in "
                f"{format_duration(resets_in(discord.utils.utcnow()))})",
                line("generations_per_user", policy.generations_per_user),
                line("questions_per_user", policy.questions_per_user),
                line("generations_per_server", policy.generations_per_server),
                line("cooldown_seconds", policy.cooldown_seconds, " s"),
                line("max_queued_per_user", policy.max_queued_per_user),
                line("max_prompt_length", policy.max_prompt_length, " characters"),
                f"Channels: {channels}",
                f"Exempt roles: {roles}",
                f"Banned words: {words}",
                f"/imagine only in age-restricted channels: {'yes' if policy.nsfw_only else 'no'}",
                f"Moderation log: {f'<#{policy.log_channel_id}>' if policy.log_channel_id else 'off'}",
                f"Today: {usage.server_generations}/{policy.generations_per_server} generations "
                "on this server.",
            ]
        ).strip()
        await reply_privately(interaction, text[:2000])

    @limits.command(name="show")
    async def limits_show(self, interaction: discord.Interaction) -> None:
        """Show this server's limits and today's usage."""
        await self.show_limits(interaction)

    @limits.command(name="set")
    @app_commands.describe(
        generations_per_user="/imagine requests per member per day (0 = off)",
        questions_per_user="Questions per member per day (0 = off)",
        generations_per_server="/imagine requests for the whole server per day (0 = off)",
        cooldown_seconds="Seconds between a member's requests (0 = none)",
        max_queued_per_user="A member's requests waiting at once (0 = off)",
        max_prompt_length="Longest prompt or question, in characters",
    )
    async def limits_set(
        self,
        interaction: discord.Interaction,
        generations_per_user: Count | None = None,
        questions_per_user: Count | None = None,
        generations_per_server: Count | None = None,
        cooldown_seconds: Count | None = None,
        max_queued_per_user: Count | None = None,
        max_prompt_length: app_commands.Range[int, 1, 2000] | None = None,
    ) -> None:
        """Change some of this server's limits; options left out stay as they are."""
        assert interaction.guild is not None
        values = {
            name: value
            for name, value in {
                "generations_per_user": generations_per_user,
                "questions_per_user": questions_per_user,
                "generations_per_server": generations_per_server,
                "cooldown_seconds": cooldown_seconds,
                "max_queued_per_user": max_queued_per_user,
                "max_prompt_length": max_prompt_length,
            }.items()
            if value is not None
        }
        if not values:
            await reply_privately(interaction, "Nothing to change: give at least one option.")
            return
        await self.bot.store.set_limits(interaction.guild.id, **values)
        await self.show_limits(interaction, "Updated.")

    @limits.command(name="reset")
    async def limits_reset(self, interaction: discord.Interaction) -> None:
        """Put every limit, list and switch back to the bot's defaults."""
        assert interaction.guild is not None
        await self.bot.store.reset_limits(interaction.guild.id)
        await self.show_limits(interaction, "Back to the defaults.")

    @limits.command(name="nsfw-only")
    @app_commands.describe(enabled="Allow /imagine only in age-restricted channels")
    async def limits_nsfw_only(self, interaction: discord.Interaction, enabled: bool) -> None:
        """Allow /imagine only in age-restricted (NSFW) channels, or everywhere."""
        assert interaction.guild is not None
        await self.bot.store.set_nsfw_only(interaction.guild.id, enabled)
        await self.show_limits(interaction, "Updated.")

    @limits.command(name="log")
    @app_commands.describe(channel="Where every generation and question is posted (leave out to turn off)")
    async def limits_log(
        self, interaction: discord.Interaction, channel: discord.TextChannel | None = None
    ) -> None:
        """Post every generation and question to a moderation channel, or stop doing so."""
        assert interaction.guild is not None
        if channel is not None:  # a private moderators' channel may be closed to the bot too
            have = channel.permissions_for(interaction.guild.me)
            missing = [name.replace("_", " ").title() for name in LOG_PERMISSIONS if not getattr(have, name)]
            if missing:
                await reply_privately(
                    interaction,
                    f"I can't post in {channel.mention}: please give me "
                    f"{', '.join(missing)} there, then run this again.",
                )
                return
        await self.bot.store.set_log_channel(interaction.guild.id, channel.id if channel else None)
        await self.show_limits(interaction, "Updated.")

    @channels.command(name="add")
    async def channel_add(self, interaction: discord.Interaction, channel: discord.TextChannel) -> None:
        """Answer in this channel (once any channel is listed, only listed channels work)."""
        await self.edit_list(interaction, "channels", channel.id, add=True)

    @channels.command(name="remove")
    async def channel_remove(self, interaction: discord.Interaction, channel: discord.TextChannel) -> None:
        """Take a channel off the list."""
        await self.edit_list(interaction, "channels", channel.id, add=False)

    @roles.command(name="add")
    async def role_add(self, interaction: discord.Interaction, role: discord.Role) -> None:
        """Free a role's members from the member limits (the server-wide limit still applies)."""
        await self.edit_list(interaction, "roles", role.id, add=True)

    @roles.command(name="remove")
    async def role_remove(self, interaction: discord.Interaction, role: discord.Role) -> None:
        """Put a role's members back under the member limits."""
        await self.edit_list(interaction, "roles", role.id, add=False)

    @words.command(name="add")
    async def word_add(self, interaction: discord.Interaction, word: app_commands.Range[str, 1, 100]) -> None:
        """Refuse prompts containing this word or phrase (whole words, any case)."""
        await self.edit_list(interaction, "words", word, add=True)

    @words.command(name="remove")
    async def word_remove(
        self, interaction: discord.Interaction, word: app_commands.Range[str, 1, 100]
    ) -> None:
        """Allow a word again."""
        await self.edit_list(interaction, "words", word, add=False)

    async def edit_list(
        self, interaction: discord.Interaction, name: ListName, value: int | str, *, add: bool
    ) -> None:
        assert interaction.guild is not None
        store = self.bot.store
        changed = await (store.add_to_list if add else store.remove_from_list)(
            interaction.guild.id, name, value
        )
        note = "Updated." if changed else ("It was already there." if add else "It wasn't on the list.")
        await self.show_limits(interaction, note)

    @app_commands.command()
    async def usage(self, interaction: discord.Interaction) -> None:
        """What you have left today, and when it resets."""
        guild = interaction.guild
        policy = await self.bot.quota.policy(guild)
        now = discord.utils.utcnow()
        usage = await self.bot.store.usage(guild.id if guild else 0, interaction.user.id, now)
        roles = [role.id for role in getattr(interaction.user, "roles", ())]
        place = "on this server" if guild else "in direct messages"
        lines = [f"**Your usage today {place}**"]
        if policy.exempts(roles):
            lines.append("Your role frees you from the member limits.")
        else:
            for noun, used, cap in (
                ("generations", usage.user_generations, policy.generations_per_user),
                ("questions", usage.user_questions, policy.questions_per_user),
            ):
                lines.append(
                    f"{noun.capitalize()}: {used}/{cap} used, {max(cap - used, 0)} left"
                    if cap
                    else f"{noun.capitalize()}: turned off here"
                )
        if guild is not None:
            lines.append(
                f"The server has used {usage.server_generations}/{policy.generations_per_server} "
                "generations today."
            )
        lines.append(f"Resets in {format_duration(resets_in(now))} (midnight UTC).")
        await reply_privately(interaction, "\n".join(lines))


async def setup(bot: JanusBot) -> None:
    await bot.add_cog(Admin(bot))
