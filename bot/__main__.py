"""Command line: `python -m bot` runs the Discord bot; `ask` and `imagine` use the model without Discord."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys
from pathlib import Path

from bot.logs import configure_logging
from bot.settings import SettingsError, load_settings


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bot", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("run", help="run the Discord bot (the default)")
    commands.add_parser("worker", help="run a GPU worker that takes jobs from Redis (EXECUTOR=redis)")

    ask = commands.add_parser("ask", help="answer a question about one or more images")
    ask.add_argument("images", nargs="*", type=Path, help="image files")
    ask.add_argument("question", help="the question")
    ask.add_argument("--seed", type=int, default=0)
    ask.add_argument("--temperature", type=float, default=0.1, help="0 = greedy")

    imagine = commands.add_parser("imagine", help="draw images from a prompt and save them as PNG")
    imagine.add_argument("prompt")
    imagine.add_argument("--out", type=Path, default=Path("out"), help="folder for the PNG files")
    imagine.add_argument(
        "--count", type=int, default=None, help="how many images (default IMAGES_PER_PROMPT)"
    )
    imagine.add_argument("--seed", type=int, default=None, help="same seed, same images (default random)")
    imagine.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    imagine.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = load_settings()
    except SettingsError as error:
        print(f"Configuration error: {error}", file=sys.stderr)
        return 2
    configure_logging(settings)
    from bot.cli import ask, imagine
    from bot.errors import StartupError

    try:
        if args.command == "ask":
            print(
                asyncio.run(
                    ask(settings, args.images, args.question, seed=args.seed, temperature=args.temperature)
                )
            )
        elif args.command == "imagine":
            count = args.count or settings.images_per_prompt
            seed = random.randrange(2**31) if args.seed is None else args.seed
            paths = asyncio.run(
                imagine(
                    settings,
                    args.prompt,
                    args.out,
                    count=count,
                    seed=seed,
                    guidance=args.guidance,
                    temperature=args.temperature,
                )
            )
            print("\n".join(str(path) for path in paths))
        elif args.command == "worker":
            from bot.redis.worker import run_worker

            return asyncio.run(run_worker(settings))
        else:
            from bot.client import GPU_STUCK_EXIT, run_bot

            code = asyncio.run(run_bot(settings))
            if code == GPU_STUCK_EXIT:  # the stuck GPU thread would keep the interpreter from ever exiting
                logging.shutdown()
                os._exit(code)
            return code
    except StartupError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
