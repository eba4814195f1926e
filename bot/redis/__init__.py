"""EXECUTOR=redis: GPU workers elsewhere run the jobs. `wire` is what the bot and the workers exchange through
Redis, `backend` the bot's side (the same `Backend` protocol as local mode), `worker` a GPU worker
(`python -m bot worker`). A reader of local mode can skip this package."""
