"""Where the bot's commands appear: pinned to server installs, so that turning on User Install in the
Developer
Portal makes nothing user-installable by accident, and to the channels where each command works."""

from __future__ import annotations

from discord import app_commands

SERVER_INSTALL = app_commands.AppInstallationType(guild=True, user=False)
SERVER_CHANNELS = app_commands.AppCommandContext(guild=True, dm_channel=False, private_channel=False)


def member_contexts(allow_dms: bool) -> app_commands.AppCommandContext:
    """Server channels, and the bot's direct messages when ALLOW_DMS is on (never group DMs)."""
    return app_commands.AppCommandContext(guild=True, dm_channel=allow_dms, private_channel=False)


def pin(
    command: app_commands.Command | app_commands.ContextMenu | app_commands.Group,
    *,
    contexts: app_commands.AppCommandContext,
) -> None:
    """Install type and contexts of a top-level command, set before the tree syncs it."""
    command.allowed_installs = SERVER_INSTALL
    command.allowed_contexts = contexts
