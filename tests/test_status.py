"""/status for admins, the Prometheus endpoint with the same figures, and leveled JSON logs."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import urllib.request

import discord
import pytest
from scene import open_scene
from settings_for_tests import settings_for_tests

from bot.logs import JsonFormatter, RedactSecret, configure_logging


async def test_admins_see_model_queue_timings_and_memory(simcord_env) -> None:
    scene = open_scene(simcord_env)
    managers = scene.guild.create_role("managers", permissions=discord.Permissions(manage_guild=True))
    admin = scene.guild.add_member(simcord_env.create_user("carol"), roles=[managers])
    await scene.alice.slash(scene.channel, "imagine", prompt="a red fox", count=1, seed=1)
    await scene.alice.send(scene.channel, f"{scene.mention} what is this?")

    result = await admin.slash(scene.channel, "status")

    text = result.response.content
    assert result.ephemeral
    assert f"`{simcord_env.bot.settings.janus_model}` on cpu (float32)" in text
    assert "0 waiting, 0 running · **jobs done** 2" in text
    assert "`imagine`: 1 recent, average" in text and "`ask`: 1 recent, average" in text and "p95" in text
    assert "**GPU memory** n/a (CPU)" in text


async def test_status_is_not_offered_to_plain_members(simcord_env) -> None:
    scene = open_scene(simcord_env)
    with pytest.raises(Exception, match="not visible"):
        await scene.alice.slash(scene.channel, "status")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_prometheus_endpoint_serves_the_status_figures(simcord_env) -> None:
    from prometheus_client.core import REGISTRY

    from bot.metrics import serve_metrics

    scene = open_scene(simcord_env)
    await scene.alice.slash(scene.channel, "imagine", prompt="a red fox", count=1, seed=1)
    port = free_port()
    collector_count = len(list(REGISTRY._collector_to_names))
    serve_metrics(simcord_env.bot, port)
    try:
        page = (
            await asyncio.to_thread(  # a scrape reads the figures on the bot's loop: it must not be blocked
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            )
        )
    finally:
        for collector in list(REGISTRY._collector_to_names)[collector_count:]:
            REGISTRY.unregister(collector)
    assert "janus_queue_waiting 0.0" in page and "janus_queue_running 0.0" in page
    assert "janus_jobs_done_total 1.0" in page
    assert 'janus_job_seconds{kind="imagine",stat="p95"}' in page
    assert "janus_model_loaded 1.0" in page


def test_json_logs_are_one_object_per_line_with_level_and_logger() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("janus.test.json")
    logger.addHandler(handler)
    try:
        logger.warning("queue at %d", 5)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("job failed")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (first["level"], first["logger"], first["message"]) == ("WARNING", "janus.test.json", "queue at 5")
    assert second["level"] == "ERROR" and "RuntimeError: boom" in second["exception"]


def test_the_token_is_redacted_from_messages_and_tracebacks(capsys: pytest.CaptureFixture[str]) -> None:
    token = "MTIz.secret-token-value"
    configure_logging(settings_for_tests(discord_token=token, log_format="json"))
    log = logging.getLogger("janus.test.redact")
    try:
        log.error("logging in with %s", token)
        try:
            raise ValueError(f"bad token {token}")
        except ValueError:
            log.exception("failed")
    finally:
        logging.getLogger().handlers.clear()
    err = capsys.readouterr().err
    assert token not in err and err.count("[redacted]") == 2


def test_redaction_leaves_other_records_alone() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    assert RedactSecret("secret").filter(record) and record.getMessage() == "hello world"
