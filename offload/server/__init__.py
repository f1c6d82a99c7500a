"""``offload-serve``: an OpenAI-compatible HTTP server for one offloaded model (FastAPI and uvicorn).

app.py        the FastAPI app: one handler per endpoint
schemas.py    request and response bodies (pydantic), apart from the serving code
prompts.py    a request as prompt tokens and sampling settings, with the checks that make a 400
engine.py     the one model and its cache: a bounded queue, one request at a time in arrival order
streaming.py  server-sent events in OpenAI's chunk format
errors.py     OpenAI-style error objects, built in one place
metrics.py    Prometheus metrics: requests, queue, tokens/s, and the runtime's expert counters
"""
