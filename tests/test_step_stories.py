"""User stories that run on the real tiny model, told again with SCHEDULER=step: the same events in and the
same messages and files out as in batch mode (the stories whose stand-in studios replace Studio's batch
methods stay in their own modules)."""

from __future__ import annotations

import pytest
from scene import Scene, open_scene

# Imported here, the stories and their fixtures are collected again with this module's SCHEDULER=step bot.
from test_bot_gallery import (  # noqa: F401
    test_the_status_becomes_the_gallery_in_one_components_v2_message,
    test_upscale_posts_that_image_alone_at_twice_the_side_as_a_reply,
    test_vary_keeps_exactly_the_first_token_rows_of_that_image_and_redraws_the_rest,
)
from test_bot_generation import (  # noqa: F401
    test_imagine_acknowledges_at_once_then_posts_the_upscaled_gallery,
    test_same_seed_same_images_and_another_seed_other_images,
    test_status_shows_queue_position_then_progress_with_previews,
)
from test_bot_understanding import (  # noqa: F401
    TOKENS,
    fixed_seed,
    pictures,
    test_follow_up_to_an_answer_uses_the_reply_chain,
    test_mention_in_a_reply_to_someones_image_answers_about_that_image,
    test_mention_without_image_gets_a_text_only_answer,
)


@pytest.fixture
async def simcord_bot(make_bot):
    # As in test_bot_generation (3 images unless asked) and test_bot_understanding (answers of TOKENS).
    return await make_bot(scheduler="step", images_per_prompt=3, max_answer_tokens=TOKENS)


@pytest.fixture
def scene(simcord_env) -> Scene:
    return open_scene(simcord_env)
