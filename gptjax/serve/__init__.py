"""Serving: an OpenAI-compatible HTTP API over a continuous-batching engine.

`engine` holds the device side (slots of one KV cache, a compiled prefill per prompt
bucket, one compiled decode step for every slot at once); `scheduler` runs it on a thread,
admitting waiting requests into free slots between decode steps; `app` is the FastAPI
application (`gptjax serve`). Imports `gptjax.runs` to load what it serves.
"""
