"""Leveled logs as text or one JSON object per line, with the bot token redacted wherever it might appear."""

from __future__ import annotations

import json
import logging

from bot.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:  # already formatted (and redacted) by RedactSecret
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


class RedactSecret(logging.Filter):
    """Replace the token in messages, arguments and tracebacks, should any library ever log it."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.secret in message:
            record.msg, record.args = message.replace(self.secret, "[redacted]"), None
        if record.exc_info and self.secret in logging.Formatter().formatException(record.exc_info):
            record.exc_text = logging.Formatter().formatException(record.exc_info).replace(self.secret, "[redacted]")
            record.exc_info = None
        return True


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT))
    if settings.discord_token is not None and settings.discord_token.get_secret_value():
        handler.addFilter(RedactSecret(settings.discord_token.get_secret_value()))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
