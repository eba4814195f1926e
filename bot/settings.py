"""Every knob of the bot in one typed class, read from the environment and `.env`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_API_BASE = "https://discord.com/api/v10"
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class Settings(BaseSettings):
    """The bot's configuration. Field names map to upper-case environment variables."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", env_ignore_empty=True
    )

    # Discord
    discord_token: SecretStr | None = Field(default=None, description="Bot token from the Developer Portal")
    discord_api_base: str = Field(
        default=DEFAULT_API_BASE, description="Where REST calls go (a proxy or emulator may stand in)"
    )
    discord_gateway_url: str | None = Field(
        default=None, description="Gateway URL; unset = ask GET /gateway/bot"
    )
    dev_guild_id: int | None = Field(
        default=None, description="Also sync commands to this server for instant updates"
    )
    allow_dms: bool = Field(default=False, description="Answer in direct messages (under the default limits)")

    # Model
    janus_model: str = Field(
        default="deepseek-community/Janus-Pro-7B", description="Hub id or local directory"
    )
    janus_device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    janus_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="auto = bf16 on GPU"
    )
    compile: bool = Field(default=False, description="torch.compile the decode step on GPU")
    max_answer_tokens: int = Field(default=512, ge=1, le=4096, description="Longest answer, in tokens")
    max_batch_images: int = Field(
        default=16, ge=1, le=64, description="Images generated together across requests"
    )
    scheduler: Literal["step", "batch"] = Field(
        default="step", description="step = requests join running steps; batch = one batch at a time"
    )

    # Upscaler
    upscaler_weights: str = Field(
        default="weights/RealESRGAN_x2.pth", description="Real-ESRGAN .pth/.safetensors or 'none'"
    )
    upscaler_tile: int = Field(
        default=512, ge=64, description="Tile side in pixels above which images are tiled"
    )

    # Service
    data_dir: Path = Field(default=Path("./data"), description="Where the usage database lives")
    images_per_prompt: int = Field(
        default=4, ge=1, le=10, description="Images per /imagine unless the member asks otherwise"
    )
    queue_size: int = Field(
        default=16, ge=1, description="Jobs waiting for the GPU before new ones are refused"
    )
    job_timeout_seconds: float = Field(
        default=600.0, gt=0, description="A job running longer than this is abandoned"
    )
    gpu_stuck_seconds: float = Field(
        default=120.0, gt=0, description="An abandoned job still on the GPU after this: stop and exit"
    )
    max_attachment_mb: float = Field(
        default=10.0, gt=0, description="Largest image attachment accepted, in MiB"
    )
    decode_concurrency: int = Field(
        default=2, ge=1, le=64, description="Images downloaded and decoded at once"
    )
    status_update_seconds: float = Field(
        default=1.0, ge=0, description="Least time between edits of a live status"
    )
    preview_seconds: float = Field(
        default=3.0, ge=0, description="How often /imagine shows the rows drawn so far"
    )
    vary_keep_rows: int | None = Field(
        default=None, ge=1, description="Token rows Vary keeps from the top; unset = a third"
    )
    interaction_token_seconds: float = Field(
        default=840.0, gt=0, le=900, description="Use a command's reply this long, then post in the channel"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Logging verbosity"
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="json = one JSON object per log line"
    )
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535, description="Serve Prometheus metrics on this port"
    )

    # Scale-out: GPU workers elsewhere, through Redis
    executor: Literal["local", "redis"] = Field(
        default="local", description="local = this process's GPU; redis = workers"
    )
    redis_url: SecretStr | None = Field(
        default=None, description="redis://[:password@]host:6379/0 (rediss:// for TLS)"
    )
    worker_lease_seconds: float = Field(
        default=30.0, gt=0, description="A silent worker's jobs go to another after this"
    )
    worker_slots: int | None = Field(
        default=None, ge=1, description="Images a worker starts at once; unset = MAX_BATCH_IMAGES"
    )
    result_ttl_seconds: int = Field(
        default=3600, ge=1, description="How long results and job events stay in Redis"
    )

    # Default per-server limits (admins override them per server)
    generations_per_user: int = Field(
        default=20, ge=0, description="/imagine requests per member per UTC day"
    )
    questions_per_user: int = Field(default=50, ge=0, description="Questions per member per UTC day")
    generations_per_server: int = Field(
        default=500, ge=0, description="/imagine requests per server per UTC day"
    )
    cooldown_seconds: int = Field(default=0, ge=0, description="Seconds between a member's requests")
    max_queued_per_user: int = Field(
        default=2, ge=0, description="A member's jobs waiting or running at once"
    )
    max_prompt_length: int = Field(
        default=500, ge=1, le=2000, description="Longest prompt or question, in characters"
    )

    @field_validator("janus_device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE_PATTERN.match(value):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("discord_api_base")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL such as https://discord.com/api/v10")
        return value.rstrip("/")

    @property
    def answer_slots(self) -> int:
        """Questions answered at once beside MAX_BATCH_IMAGES images (SCHEDULER=step): one per four images."""
        return max(1, self.max_batch_images // 4)

    @property
    def upscaling_enabled(self) -> bool:
        return self.upscaler_weights.strip().lower() != "none"

    @property
    def database_path(self) -> Path:
        return self.data_dir / "usage.db"


class SettingsError(Exception):
    """A configuration problem, phrased as one line a server owner can act on."""


def describe_validation_error(error: ValidationError) -> str:
    """Turn pydantic's report into one line per bad setting, naming the environment variable."""
    lines = []
    for problem in error.errors():
        name = "_".join(str(part) for part in problem["loc"]).upper() or "settings"
        shown = "" if "TOKEN" in name else f" (got {problem.get('input')!r})"
        lines.append(f"{name}: {problem['msg']}{shown}; fix it in .env or the environment")
    return "; ".join(lines)


def load_settings(**overrides: object) -> Settings:
    """Read the settings, raising SettingsError with a readable line instead of a traceback."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        raise SettingsError(describe_validation_error(error)) from None
