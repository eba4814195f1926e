"""The compiled decode step (COMPILE=true) draws exactly what the eager loop draws, on the CPU."""

from __future__ import annotations

import torch

from bot.engine import ImagineRequest, JanusEngine

REQUESTS = [
    ImagineRequest("a red fox in the snow", count=2, seed=7),
    ImagineRequest("a castle on a hill at dawn", count=1, guidance=3.0, temperature=0.0, seed=3),
]


def test_compiled_decode_step_matches_the_eager_loop(studio) -> None:
    eager = studio.engine
    compiled = JanusEngine(eager.model, eager.processor, compile=True)
    assert compiled.decode_step is not compiled._forward  # the compiled path is what runs below
    expected = eager.generate_tokens(eager.prepare_batch(REQUESTS))  # [3, 16]
    for _ in range(2):  # the first run compiles, the second replays
        batch = compiled.prepare_batch(REQUESTS)
        assert batch.input_ids.shape[0] == 8  # 3 images padded to a bucket of 4, times two for guidance
        assert torch.equal(compiled.generate_tokens(batch)[:3], expected)
