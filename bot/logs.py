"""Leveled logs as text or one JSON object per line, with the bot token and interaction tokens redacted
wherever
they might appear."""

from __future__ import annotations

import json
import logging
import re

from bot.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:  # already formatted (and redacted) by RedactSecret
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


# An interaction's token in a webhook or callback URL (/webhooks/{app}/{token}/...,
# /interactions/{id}/{token}/...):
# for 15 minutes it lets anyone post as the bot in that channel.
INTERACTION_TOKEN = re.compile(r"(/(?:webhooks|interactions)/\d+/)[^/\s?#\"'<>]+")


class RedactSecret(logging.Filter):
    """Replace the bot token, and every interaction token in a webhook or callback URL, in messages, arguments
    and tracebacks, at every level, should any library ever log them."""

    def __init__(self, secret: str | None = None) -> None:
        super().__init__()
        self.secret = secret

    def redact(self, text: str) -> str:
        if self.secret:
            text = text.replace(self.secret, "[redacted]")
        return INTERACTION_TOKEN.sub(r"\1[redacted]", text)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if (redacted := self.redact(message)) != message:
            record.msg, record.args = redacted, None
        if record.exc_info:
            trace = logging.Formatter().formatException(record.exc_info)
            if (redacted := self.redact(trace)) != trace:
                record.exc_text, record.exc_info = redacted, None
        return True


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT))
    token = settings.discord_token.get_secret_value() if settings.discord_token is not None else None
    handler.addFilter(RedactSecret(token))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
