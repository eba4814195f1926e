"""The Discord client: owns the services, loads the cogs, syncs commands, renders errors in one place."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

import discord
import discord.gateway
import discord.http
import yarl
from discord import app_commands
from discord.ext import commands

from bot.backends import Backend, LocalBackend
from bot.errors import JobCancelled, StartupError, UserFacingError
from bot.executor import GpuExecutor
from bot.jobs import Reporter
from bot.quota import Quota
from bot.settings import Settings
from bot.store import UsageStore

log = logging.getLogger(__name__)

EXTENSIONS = ("cogs.understanding", "cogs.generation", "cogs.gallery", "cogs.admin", "cogs.status")
SORRY = "Sorry, something went wrong on my side. Please try again in a moment."
SHUTDOWN_GRACE_SECONDS = 60.0
GPU_STUCK_EXIT = (
    3  # the exit code when the GPU thread never came back: restart the process (compose, systemd)
)


def make_intents() -> discord.Intents:
    intents = discord.Intents.default()
    intents.message_content = True  # to read questions and the images of replied-to messages
    return intents


def point_at_discord(settings: Settings) -> None:
    """Send REST calls to DISCORD_API_BASE and, when set, connect to DISCORD_GATEWAY_URL."""
    discord.http.Route.BASE = settings.discord_api_base
    if settings.discord_gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)


class JanusBot(commands.AutoShardedBot):
    """The bot: settings, usage store, the backend that runs its jobs, and for local mode the GPU executor and
    (once loaded) the model studio, shared by all cogs."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: UsageStore,
        executor: GpuExecutor,
        backend: Backend | None = None,
        studio: Any | None = None,
        shard_count: int | None = None,
    ) -> None:
        """`backend` runs the jobs: GPU workers through Redis, or by default this process's GPU thread."""
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=make_intents(),
            help_command=None,
            shard_count=shard_count,
            allowed_mentions=discord.AllowedMentions(
                everyone=False, users=False, roles=False, replied_user=True
            ),
        )
        point_at_discord(settings)
        self.settings, self.store, self.executor = settings, store, executor
        self.backend: Backend = backend or LocalBackend(executor, lambda: self.studio, settings)
        self.quota = Quota(self)
        self.studio = studio  # a bot.studio.Studio; loaded on the GPU thread in setup_hook when not given
        self.started_at = time.perf_counter()
        self.exit_code = 0
        executor.on_stuck = self._gpu_stuck
        self.tree.on_error = self.on_app_command_error
        if settings.discord_gateway_url:
            self._use_configured_gateway(settings.discord_gateway_url)

    def _use_configured_gateway(self, url: str) -> None:
        """Auto-sharding asks GET /gateway/bot for the shard count and URL; keep the count, use our URL."""
        ask_discord = self.http.get_bot_gateway

        async def get_bot_gateway() -> tuple[int, str, Any]:
            shards, _url, limits = await ask_discord()
            return shards, url, limits

        self.http.get_bot_gateway = get_bot_gateway

    async def setup_hook(self) -> None:
        self.executor.start()
        if self.studio is None and self.settings.executor == "local":  # with redis, the workers load it
            self.loop.create_task(self._load_studio(), name="load-model")
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        await self.tree.sync()
        if self.settings.dev_guild_id:
            guild = discord.Object(self.settings.dev_guild_id)
            self.tree.copy_global_to(guild=guild)
            await self.tree.sync(guild=guild)

    async def _load_studio(self) -> None:
        """Load the model as the executor's first job, so requests simply queue behind it."""
        from bot.studio import Studio

        def load(_report: Reporter) -> None:
            # Assigned on the GPU thread itself, so the jobs queued behind the load see it at once.
            self.studio = Studio.load(self.settings, preview_seconds=self.settings.preview_seconds)

        try:  # however long it takes: JOB_TIMEOUT_SECONDS is for members' jobs
            await self.executor.submit(load, kind="load", timed=False)
        except JobCancelled:  # shutting down meanwhile
            return
        except StartupError as error:
            reason = str(error)
        except Exception as error:  # noqa: BLE001 - warming up, CUDA, a bug: any failure stops the bot
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            reason = f"JANUS_MODEL: could not load {self.settings.janus_model!r}: {first_line}"
        else:
            return
        log.critical("%s", reason)
        self.exit_code = 1
        await self.executor.close("Sorry, the model could not be loaded; the bot's owner has been told.")
        await self.close()

    def _gpu_stuck(self) -> None:
        """The executor gave up on its GPU thread (it told the waiting members): exit, to be restarted."""
        self.exit_code = GPU_STUCK_EXIT
        self.loop.create_task(self.shutdown(), name="gpu-stuck-shutdown")

    async def on_message(self, message: discord.Message, /) -> None:
        """No prefix commands: the cogs listen to messages themselves (so a mention is no CommandNotFound)."""

    async def on_ready(self) -> None:
        log.info(
            "Logged in as %s (%s) on %d server(s)", self.user, getattr(self.user, "id", "?"), len(self.guilds)
        )

    async def on_app_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        """Every slash command, context menu and button error ends here: a polite, ephemeral answer."""
        original = getattr(error, "original", error)
        if isinstance(original, UserFacingError | app_commands.CheckFailure):
            text = str(original)
        else:
            command = interaction.command.qualified_name if interaction.command else "?"
            log.error("Command %s failed", command, exc_info=original)
            text = SORRY
        await reply_privately(interaction, text)

    async def shutdown(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Stop taking requests, tell the queued members, let the running job finish and every answer go out,
        then log out."""
        log.info(
            "Shutting down: finishing the running job (up to %.0fs), telling %d queued member(s)",
            grace,
            max(self.executor.depth - len(self.executor.running), 0),
        )
        started = time.perf_counter()
        self.backend.stop_accepting()
        await self.executor.close(grace=grace)
        serving = self.quota.in_flight - {asyncio.current_task()}
        if serving:  # results still being delivered and members being told need the connection and the store
            await asyncio.wait(serving, timeout=max(grace - (time.perf_counter() - started), 10.0))
        await self.close()


async def reply_privately(interaction: discord.Interaction, text: str) -> None:
    """An ephemeral answer whether or not the interaction was already acknowledged; never raises."""
    try:
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)
    except discord.HTTPException as error:
        log.warning("Could not tell %s: %s (%s)", interaction.user, text, error)


async def acknowledge(interaction: discord.Interaction) -> None:
    """Show "thinking…" for a request that was taken. When Discord refuses (the interaction is unknown,
    10062, or
    was already acknowledged, 40060), the work goes ahead anyway: its answer then falls back to the
    channel."""
    try:
        await interaction.response.defer(thinking=True)
    except discord.HTTPException as error:
        log.warning(
            "Could not acknowledge %s's request (%s); it will still be answered", interaction.user, error
        )


async def run_bot(settings: Settings) -> int:
    """`python -m bot`: open the store and the executor, connect, and serve until stopped."""
    from bot.redis.backend import open_backend

    if settings.discord_token is None:
        raise StartupError(
            "DISCORD_TOKEN is not set: copy your bot's token from the Discord Developer Portal "
            "(Bot > Reset Token) into .env as DISCORD_TOKEN=..."
        )
    async with (
        UsageStore.open(settings.database_path) as store,
        GpuExecutor(
            settings.queue_size,
            max_batch=settings.max_batch_images,
            job_timeout=settings.job_timeout_seconds,
            stuck_grace=settings.gpu_stuck_seconds,
            notify_interval=settings.status_update_seconds,
        ) as executor,
        open_backend(settings) as remote,  # None unless EXECUTOR=redis
    ):
        # With GPU workers (python -m bot worker) running the jobs, none runs in this process.
        bot = JanusBot(settings=settings, store=store, executor=executor, backend=remote)
        if settings.metrics_port:
            from bot.metrics import serve_metrics

            serve_metrics(bot, settings.metrics_port)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, lambda: asyncio.ensure_future(bot.shutdown()))
        async with bot:
            try:
                await bot.start(settings.discord_token.get_secret_value())
            except discord.LoginFailure:
                raise StartupError(
                    "DISCORD_TOKEN was rejected by Discord: copy a fresh token from the "
                    "Developer Portal (Bot > Reset Token) into .env"
                ) from None
            except discord.PrivilegedIntentsRequired:
                raise StartupError(
                    "Discord refused the Message Content intent: turn it on in the Developer "
                    "Portal (Bot > Privileged Gateway Intents > Message Content)"
                ) from None
    log.info("Logged out")
    return bot.exit_code
