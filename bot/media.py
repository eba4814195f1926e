"""Discord attachments in, Discord files and messages out: the checks and limits of both directions."""

from __future__ import annotations

import asyncio
import io
import unicodedata
from collections.abc import Sequence

import discord
from PIL import Image

from bot.errors import BadAttachment
from bot.images import IMAGE_EXTENSIONS, decode_image, encode_for_upload

MESSAGE_LIMIT = 2000
FILES_PER_MESSAGE = 10
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024  # Discord's limit for servers without boosts
# Unicode's control, format (zero-width, bidi overrides and isolates, soft hyphen, the invisible tag
# characters
# that can smuggle text to a model) and line/paragraph separator classes.
_INVISIBLE = frozenset({"Cc", "Cf", "Zl", "Zp"})


def is_image(attachment: discord.Attachment) -> bool:
    """Judged by declared content type or file name, before anything is downloaded."""
    if attachment.content_type:
        return attachment.content_type.split(";")[0].strip().startswith("image/")
    return attachment.filename.lower().endswith(IMAGE_EXTENSIONS)


def check_attachment(attachment: discord.Attachment, *, max_bytes: int) -> None:
    """Refuse, before downloading, what is not an image or is over the size cap (raises BadAttachment)."""
    if not is_image(attachment):
        raise BadAttachment(
            f"`{clean_name(attachment.filename)}` isn't an image; I can read PNG, JPEG, WebP and GIF files."
        )
    if attachment.size > max_bytes:
        raise BadAttachment(
            f"`{clean_name(attachment.filename)}` is {file_size(attachment.size)}; "
            f"the limit is {file_size(max_bytes)}."
        )


async def read_image(
    attachment: discord.Attachment, *, max_bytes: int, decoding: asyncio.Semaphore
) -> Image.Image:
    """Download and decode one image attachment (Discord's own CDN URL only), or raise BadAttachment. The
    bytes and the full-size pixels exist only while a `decoding` slot is held: a few at a time in the bot."""
    check_attachment(attachment, max_bytes=max_bytes)
    async with decoding:
        try:
            data = await attachment.read()
        except discord.HTTPException:
            raise BadAttachment(
                f"I couldn't download `{clean_name(attachment.filename)}`; please try again."
            ) from None
        if len(data) > max_bytes:  # the declared size lied
            raise BadAttachment(
                f"`{clean_name(attachment.filename)}` is larger than the {file_size(max_bytes)} limit."
            )
        return await asyncio.to_thread(decode_image, data)


async def read_images(
    attachments: Sequence[discord.Attachment], *, max_bytes: int, limit: int, decoding: asyncio.Semaphore
) -> list[Image.Image]:
    """The image attachments among `attachments` (at most `limit`); non-images are refused politely, before
    any of them is downloaded."""
    for attachment in attachments[:limit]:
        check_attachment(attachment, max_bytes=max_bytes)
    return [await read_image(a, max_bytes=max_bytes, decoding=decoding) for a in attachments[:limit]]


def file_size(size: int) -> str:
    """1536 -> '1.5 KiB', 10485760 -> '10 MiB'."""
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} bytes"


def clean_name(name: str) -> str:
    return discord.utils.escape_markdown(clean_text(name))[:80]


def clean_text(text: str) -> str:
    """Drop invisible and control characters (keeping newlines and tabs) and trim."""
    return "".join(c for c in text if c in "\n\t" or unicodedata.category(c) not in _INVISIBLE).strip()


def split_message(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """Split text into messages of at most `limit` characters, at a line, then sentence, then word break."""
    chunks: list[str] = []
    rest = text.strip()
    while len(rest) > limit:
        window = rest[:limit]
        cut = window.rfind("\n")
        if cut < limit // 2:
            cut = max(window.rfind(". "), window.rfind("! "), window.rfind("? "))
            cut = cut + 1 if cut >= limit // 2 else window.rfind(" ")
        if cut < limit // 2:
            cut = limit
        chunks.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        chunks.append(rest)
    return chunks


def with_prefix(prefix: str, chunks: Sequence[str], limit: int = MESSAGE_LIMIT) -> list[str]:
    """The text of `chunks` split anew with "`prefix` " in front of each message (a mention, in a channel
    fallback), so that every message still fits in `limit` characters and nothing is cut off."""
    return [f"{prefix} {part}" for part in split_message("\n".join(chunks), limit - len(prefix) - 1)]


def missing_permission(channel: object, *, files: bool = False) -> str | None:
    """The permission the bot lacks to post (with files, if `files`) in a server channel, as Discord's
    settings
    name it; None when it has them or the channel is not a server's."""
    guild = getattr(channel, "guild", None)
    if guild is None or guild.me is None:
        return None
    permissions = channel.permissions_for(guild.me)  # type: ignore[attr-defined]
    if isinstance(channel, discord.Thread):
        if not permissions.send_messages_in_threads:
            return "Send Messages in Threads"
    elif not permissions.send_messages:
        return "Send Messages"
    if files and not permissions.attach_files:
        return "Attach Files"
    return None


def cannot_post(missing: str | None) -> str:
    """What to tell a member when Discord refused our post (403) for want of `missing` (None: unknown)."""
    if missing is None:
        return "Discord didn't let me post in this channel; please ask an admin to check my permissions here."
    action = "attach files" if missing == "Attach Files" else "post"
    return f"I can't {action} in this channel; please ask an admin to give me {missing}."


def upload_limit(guild: discord.Guild | None) -> int:
    return guild.filesize_limit if guild is not None else DEFAULT_UPLOAD_LIMIT


async def image_files(images: Sequence[Image.Image], stem: str, *, limit: int) -> list[list[discord.File]]:
    """Encode images as files and group them into messages that respect Discord's count and size limits."""
    per_image = limit // 2 if len(images) > 1 else limit  # leave room so most groups hold several images
    encoded = await asyncio.to_thread(lambda: [encode_for_upload(image, per_image) for image in images])
    groups: list[list[discord.File]] = [[]]
    size = 0
    for index, (data, extension) in enumerate(encoded):
        if groups[-1] and (len(groups[-1]) == FILES_PER_MESSAGE or size + len(data) > limit):
            groups.append([])
            size = 0
        groups[-1].append(discord.File(io.BytesIO(data), filename=f"{stem}_{index + 1}.{extension}"))
        size += len(data)
    return groups


def quote(text: str, limit: int = 300) -> str:
    """User text, stripped of formatting that could break out of our message, and then shortened: at most
    `limit` characters however many escapes it took."""
    escaped = discord.utils.escape_markdown(clean_text(text).replace("\n", " "))
    if len(escaped) <= limit:
        return escaped
    cut = escaped[: limit - 1]
    if (len(cut) - len(cut.rstrip("\\"))) % 2:  # do not leave a lone backslash escaping the ellipsis
        cut = cut[:-1]
    return cut + "…"
