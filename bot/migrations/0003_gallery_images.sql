-- Upscale, Vary and Remix (per image of a gallery), and the prompts /describe suggests: what their buttons need
-- after a restart.

-- The image tokens a gallery's variations all start with (none for an ordinary gallery), little-endian uint32.
ALTER TABLE galleries ADD COLUMN keep BLOB NOT NULL DEFAULT x'';
-- A variation's gallery and image (0-based) it keeps the top of.
ALTER TABLE galleries ADD COLUMN parent_id INTEGER REFERENCES galleries (id);
ALTER TABLE galleries ADD COLUMN parent_index INTEGER CHECK (parent_index >= 0);

-- Each image's tokens (row-major over the token grid, little-endian uint32), for Upscale and Vary.
CREATE TABLE gallery_images (
    gallery_id INTEGER NOT NULL REFERENCES galleries (id),
    idx        INTEGER NOT NULL CHECK (idx >= 0),
    tokens     BLOB NOT NULL,
    PRIMARY KEY (gallery_id, idx)
) WITHOUT ROWID;

-- The messages a gallery was posted in (more than one when the server's upload limit split it), for Delete.
CREATE TABLE gallery_messages (
    gallery_id INTEGER NOT NULL REFERENCES galleries (id),
    channel_id INTEGER NOT NULL,
    message_id INTEGER NOT NULL,
    PRIMARY KEY (gallery_id, message_id)
) WITHOUT ROWID;

-- Prompts /describe wrote for an image; each "Imagine n" button carries one's id.
CREATE TABLE suggested_prompts (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    guild_id     INTEGER NOT NULL,
    requester_id INTEGER NOT NULL,
    prompt       TEXT NOT NULL CHECK (prompt <> ''),
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);
