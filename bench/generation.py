"""Image generation speed, measured side by side in one run (this machine is noisy: compare the ratios).

    python -m bench.generation                      # tiny and mid-size random models on the CPU
    python -m bench.generation --sizes 1b 7b --device cuda --dtype bfloat16   # real architectures, random
    weights

Prints, for each model size: per-step time and images/s of (1) a loop written like DeepSeek's demo,
(2) transformers' generate(generation_mode="image"), (3) ours (static cache / compiled where asked);
then throughput and p50 latency with 1, 4 and 8 concurrent requests through the executor, batching on vs off.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from tiny_models import JANUS_PRO_1B, JANUS_PRO_7B, MID, TINY, JanusShape, build_random_janus  # noqa: E402

from bot.engine import ImagineRequest, JanusEngine  # noqa: E402
from bot.executor import GpuExecutor  # noqa: E402

SHAPES: dict[str, JanusShape] = {"tiny": TINY, "mid": MID, "1b": JANUS_PRO_1B, "7b": JANUS_PRO_7B}
PROMPT = "a red fox in the snow, watercolor"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Best wall time of `repeats` runs after one warm-up run, in seconds."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best


@torch.inference_mode()
def demo_loop(engine: JanusEngine, prompt: str, count: int, guidance: float = 5.0) -> torch.Tensor:
    """Image generation written like DeepSeek's demo: interleaved cond/uncond rows, a growing dynamic cache,
    softmax + multinomial each step, then one VQ decode."""
    model, tokenizer = engine.model, engine.tokenizer
    # The processor's kwargs type omits the flat `return_tensors` it accepts and routes to each modality.
    inputs = engine.processor(
        text=[engine.prompt_text(prompt)],
        generation_mode="image",
        return_tensors="pt",  # pyright: ignore[reportCallIssue]
    )
    ids = inputs["input_ids"][0].to(engine.device)
    tokens = ids.repeat(2 * count, 1)
    tokens[1::2, 1:-1] = tokenizer.pad_token_id  # odd rows: unconditional
    embeds = model.get_input_embeddings()(tokens)
    cache = DynamicCache(config=engine.text_config)
    out = torch.zeros((count, engine.num_image_tokens), dtype=torch.long, device=engine.device)
    for step in range(engine.num_image_tokens):
        hidden = model.model.language_model(
            inputs_embeds=embeds, cache=cache, use_cache=True
        ).last_hidden_state
        logits = model.model.generation_head(hidden[:, -1, :])
        logits = logits[1::2] + guidance * (logits[0::2] - logits[1::2])
        chosen = torch.multinomial(torch.softmax(logits.float(), dim=-1), 1).squeeze(-1)
        out[:, step] = chosen
        embeds = model.prepare_embeddings_for_image_generation(chosen.repeat_interleave(2)).unsqueeze(1)
    model.decode_image_tokens(out)
    return out


@torch.inference_mode()
def hf_generate(engine: JanusEngine, prompt: str, count: int, guidance: float = 5.0) -> torch.Tensor:
    inputs = engine.processor(
        text=[engine.prompt_text(prompt)],
        generation_mode="image",
        return_tensors="pt",  # pyright: ignore[reportCallIssue]  # flat kwarg, missing from the kwargs type
    ).to(engine.device)
    # Image mode returns the image tokens as a tensor (no return_dict_in_generate).
    tokens = cast(
        torch.Tensor,
        engine.model.generate(
            **inputs,
            generation_mode="image",
            do_sample=True,
            top_k=0,
            temperature=1.0,
            guidance_scale=guidance,
            num_return_sequences=count,
        ),
    )
    engine.model.decode_image_tokens(tokens)
    return tokens


def ours(engine: JanusEngine, prompt: str, count: int) -> None:
    engine.imagine_batch([ImagineRequest(prompt, count=count, seed=1)])


def loops(engine: JanusEngine, count: int, repeats: int) -> list[tuple[str, float]]:
    """(name, seconds per set of `count` images) for the three loops."""
    device = engine.device
    return [
        ("demo-style loop", timed(lambda: demo_loop(engine, PROMPT, count), device, repeats)),
        ("transformers generate", timed(lambda: hf_generate(engine, PROMPT, count), device, repeats)),
        ("ours", timed(lambda: ours(engine, PROMPT, count), device, repeats)),
    ]


async def concurrent(engine: JanusEngine, requests: int, batching: bool) -> tuple[float, float]:
    """(images/s, p50 latency s) for `requests` one-image requests arriving together."""
    async with GpuExecutor(64, max_batch=16 if batching else 1) as executor:
        started = time.perf_counter()
        jobs = [
            executor.submit_batched(
                engine.imagine_batch, ImagineRequest(f"{PROMPT} #{i}", count=1, seed=i), weight=1
            )
            for i in range(requests)
        ]
        latencies = []
        for job in jobs:
            await job
            latencies.append(time.perf_counter() - started)
        elapsed = time.perf_counter() - started
    return requests / elapsed, statistics.median(latencies)


def bench_size(name: str, args: argparse.Namespace) -> list[str]:
    shape = SHAPES[name]
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    model, processor = build_random_janus(shape, device=args.device, dtype=dtype)
    engine = JanusEngine(model, processor, compile=args.compile, static_cache=args.static)
    params = sum(p.numel() for p in model.model.language_model.parameters()) / 1e6
    print(
        f"\n## {name}: language model {params:.0f} M params, {engine.num_image_tokens} image tokens, "
        f"{engine.image_size} px, {args.device} {args.dtype} (built in {time.perf_counter() - started:.1f}s)"
    )
    lines = [
        f"### {name} ({params:.0f} M-param LM, {engine.num_image_tokens} tokens/image, {args.device}, "
        f"{args.dtype}{', compiled' if args.compile else ''})",
        "",
        f"| loop ({args.count} images, guidance 5) | per step | images/s | time / ours |",
        "|---|---|---|---|",
    ]
    results = loops(engine, args.count, args.repeats)
    ours_time = results[-1][1]
    for label, seconds in results:
        step_ms = 1000 * seconds / engine.num_image_tokens
        lines.append(
            f"| {label} | {step_ms:.2f} ms | {args.count / seconds:.2f} | {seconds / ours_time:.2f} |"
        )
    lines += ["", "| concurrent 1-image requests | batching | images/s | p50 latency |", "|---|---|---|---|"]
    rates = {}
    for requests in (1, 4, 8):
        for batching in (False, True):
            rate, p50 = asyncio.run(concurrent(engine, requests, batching))
            rates[requests, batching] = rate
            lines.append(f"| {requests} | {'on' if batching else 'off'} | {rate:.2f} | {p50:.2f} s |")
    lines.append("")
    lines.append(
        f"8 concurrent requests with batching: {rates[8, True] / rates[8, False]:.1f}x the throughput "
        f"of the same requests one at a time (target >= 3x)."
    )
    print("\n".join(lines))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=sorted(SHAPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--count", type=int, default=4, help="images per set in the loop comparison")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--static", action="store_true", help="our loop with a static KV cache")
    parser.add_argument("--compile", action="store_true", help="our decode step compiled (implies --static)")
    parser.add_argument("--record", type=Path, help="append the tables to this markdown file")
    args = parser.parse_args()
    torch.manual_seed(0)
    sections = [line for name in args.sizes for line in bench_size(name, args)]
    if args.record:
        stamp = time.strftime("%Y-%m-%d")
        with args.record.open("a") as out:
            out.write(f"\n## {stamp} — `python -m bench.generation {' '.join(sys.argv[1:])}`\n\n")
            out.write("\n".join(sections) + "\n")


if __name__ == "__main__":
    main()
