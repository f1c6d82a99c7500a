"""``offload-serve``: an OpenAI-compatible HTTP server for one offloaded MoE model.

Takes offload-run's model, budget and runtime options (offload.cli.options; --max-new-tokens, --temperature
and --repetition-penalty become the defaults of requests that leave them out, --seed seeds the sampler once at
start-up, --stats-json and --record-trace are written when the server stops), plus where to listen and who
may ask. The port is bound and the model loaded before the first request is accepted; bad options, a busy
port or a model that cannot load get one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

from offload.cli.options import (
    OneLineParser,
    UsageError,
    add_model_options,
    choose_model,
    command_main,
    demo_banner,
    validate_model_options,
    write_json,
)

PROG = "offload-serve"
API_KEY_ENV = "OFFLOAD_API_KEY"
DEMO_NAME = "moe-offload-demo"
REQUEST_COUNTS = ("completed", "cancelled", "failed")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Serve a Hugging Face MoE checkpoint whose experts do not fit in the VRAM budget over an "
        "OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics). "
        "With no --model, serves the demo: the reference MoE trained on Python source "
        "(data/models/reference-moe).",
    )
    add_model_options(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    p.add_argument(
        "--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)"
    )
    p.add_argument(
        "--api-key",
        help=f"require 'Authorization: Bearer KEY' on /v1 requests (default: ${API_KEY_ENV} if set, else none)",
    )
    p.add_argument(
        "--queue-size",
        type=int,
        default=16,
        help="requests that may wait while one runs; more are answered 429 (default 16)",
    )
    p.add_argument(
        "--served-model-name",
        help=f"the model name clients send (default: --model as given, or {DEMO_NAME!r} for the demo)",
    )
    p.add_argument(
        "--log-level",
        choices=("critical", "error", "warning", "info", "debug"),
        default="info",
        help="server log level (default info: one line per request)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    return command_main(PROG, build_parser(), _serve, argv)


def _serve(args: argparse.Namespace) -> int:
    validate_model_options(args)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be 0..65535, got {args.port}")
    if args.queue_size < 0:
        raise UsageError(f"--queue-size must be 0 or more, got {args.queue_size}")
    api_key = (
        args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    ) or None  # "" is none
    # Bound before loading, so a busy port fails in a second; connections wait in the backlog meanwhile.
    sock = _listen(args.host, args.port)
    try:
        return _load_and_serve(args, sock, api_key)
    finally:
        sock.close()


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        return socket.create_server(address, family=family)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _load_and_serve(args: argparse.Namespace, sock: socket.socket, api_key: str | None) -> int:
    import torch
    import uvicorn

    import offload
    from offload.hf.generation import load_tokenizer
    from offload.hf.load import load_offloaded
    from offload.server.app import create_app
    from offload.server.engine import Engine
    from offload.server.prompts import Defaults

    choice = choose_model(args)
    tokenizer = load_tokenizer(choice.path)
    if choice.demo:
        print(demo_banner(choice, args), file=sys.stderr)
    torch.manual_seed(args.seed)  # requests without a seed continue this stream
    model = load_offloaded(choice.path, choice.config)
    try:
        name = args.served_model_name or (DEMO_NAME if choice.demo else args.model)
        engine = Engine(
            model, tokenizer, model_name=name, max_context=args.max_context, queue_size=args.queue_size
        )
        app = create_app(
            engine,
            lambda: offload.stats(model),
            api_key=api_key,
            defaults=Defaults(args.max_new_tokens, args.temperature, args.repetition_penalty),
        )
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(
            f"{PROG}: serving {name!r} at http://{shown}:{port}/v1"
            f"{' (API key required)' if api_key else ''}; Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
        # uvicorn shuts down gracefully on SIGINT or SIGTERM, then raises the signal again for the previous
        # handler. The server is down by then, but the stats and the trace are still to be written: SIGTERM
        # is ignored for that moment and Ctrl-C's KeyboardInterrupt caught.
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
        stats = offload.stats(model)
        if args.record_trace is not None:
            offload.routing_trace(model).save(args.record_trace.expanduser())
        if args.stats_json is not None:
            counters = {
                f"requests_{k}" if k in REQUEST_COUNTS else k: v for k, v in vars(engine.snapshot()).items()
            }
            write_json(
                args.stats_json, {"model": choice.path, "demo": choice.demo, **counters, **stats.as_dict()}
            )
    finally:
        offload.close(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
