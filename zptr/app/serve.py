"""``zptr serve MODEL.gguf``: an OpenAI-compatible HTTP server with Omega routing (flags as
llama-server: ``--host``, ``--port`` 8080, ``-c``, ``-t``, ``-ngl``, ``--api-key``, ``-a/--alias``).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus) and the chat page at ``/``. ``-np N`` requests
decode together (continuous batching); ``--queue N`` more may wait for a slot (beyond that: 503
with Retry-After). ``--port 0`` picks a free
port; the line printed at start-up names the address actually bound. Only ``Host`` names of this
server, same-origin (or ``--cors``) pages and JSON POSTs are answered; ``--max-body-bytes`` and
``--timeout`` bound a request's size and read time.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
from pathlib import Path

from ..errors import ConfigError, Interrupted, ZptrError
from ..runtime.engine import DEFAULT_BATCH, ZptrLlama
from .args import add_engine_arguments, engine_options

DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024  # a 128k-token context of JSON-escaped text, with room
DEFAULT_TIMEOUT_S = 20.0  # to send a request's headers, and its body after them

DEFAULT_QUEUE = 16
DEFAULT_PARALLEL = 4  # as llama-server, Ollama and LM Studio


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="GGUF model file (its Omega sidecar X.omega.gguf next to it)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: any free port)")
    parser.add_argument("-a", "--alias", default=None,
                        help="the model's name in the API (default: the file name without .gguf)")
    add_engine_arguments(parser, omega_help="default Omega mode: auto (fast when a sidecar pairs), off, exact, "
                         "fast; a request may choose off | exact | fast unless the server runs off",
                         origin_help="default origin text (a request's own 'origin' replaces it)")
    parser.add_argument("--api-key", default=os.environ.get("ZPTR_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1/* and /metrics "
                             "(default: $ZPTR_API_KEY; none: open)")
    parser.add_argument("-np", "--parallel", type=int, default=DEFAULT_PARALLEL, metavar="N",
                        help=f"slots: requests decoded together (default {DEFAULT_PARALLEL}); each "
                             "holds -c tokens of KV cache")
    parser.add_argument("-b", "--batch-size", type=int, default=DEFAULT_BATCH, metavar="N",
                        help=f"tokens per decode step, prompt chunks included (default {DEFAULT_BATCH})")
    parser.add_argument("--cache-prompt", action="store_true",
                        help="a slot reuses the KV cache of the prefix a prompt shares with its last "
                             "request (faster long chats; a greedy answer may then depend on the requests "
                             "before it by a flipped near-tie); default: every request decodes from scratch")
    parser.add_argument("--queue", type=int, default=DEFAULT_QUEUE, metavar="N",
                        help=f"requests that may wait for the model (default {DEFAULT_QUEUE}); "
                             "one more gets 503 with Retry-After")
    limits = parser.add_argument_group("security", "what the server answers at all (refusals are "
                                       "OpenAI-style JSON errors)")
    limits.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, metavar="N",
                        help=f"largest request body (default {DEFAULT_MAX_BODY_BYTES}); a larger one "
                             "gets 413 before it is read")
    limits.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                        help=f"seconds a client has to send a request's headers, and then its body "
                             f"(default {DEFAULT_TIMEOUT_S:g}); a late body gets 408, late headers "
                             "a closed connection")
    limits.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                        help="let pages of ORIGIN (scheme://host[:port]; repeatable) call the API: "
                             "preflights answered, Access-Control-Allow-Origin set; requests whose "
                             "Origin is another site's are refused (403) otherwise")
    limits.add_argument("--host-check", choices=("on", "off"), default="on",
                        help="on (default): answer only a Host of localhost, a loopback address, "
                             "--host, an --allowed-host, or (binding 0.0.0.0 or ::) any IP address — "
                             "DNS rebinding's names are refused (403)")
    limits.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="one more Host name the server answers to (repeatable), e.g. the "
                             "name a reverse proxy forwards")


def _bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads: a taken port is one clear error line
    at once (it listens once the model is ready, so no client waits on a loading server)."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must lie in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ConfigError(f"--host {host}: {err.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ZptrError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    return sock


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from .httpd import GracefulServer, header_timeout_protocol
    from .server import HostCheck, check_limits, cors_origin, create_app

    options = engine_options(args)
    if args.queue < 0:
        raise ConfigError(f"--queue must be 0 or more, got {args.queue}")
    if args.api_key is not None and not args.api_key.strip():
        raise ConfigError("--api-key is empty")
    check_limits(args.max_body_bytes, args.timeout)
    for origin in args.cors:
        cors_origin(origin)
    hosts = None if args.host_check == "off" else HostCheck(args.host, args.allowed_host)
    sock = _bind(args.host, args.port)
    try:
        llm = ZptrLlama(args.model, n_parallel=args.parallel, n_batch=args.batch_size,
                        cache_prompt=args.cache_prompt, **options)
        try:
            name = args.alias or Path(args.model).name.removesuffix(".gguf")
            app = create_app(llm, model_name=name, api_key=args.api_key, queue_size=args.queue,
                             hosts=hosts, cors=args.cors, max_body_bytes=args.max_body_bytes,
                             timeout=args.timeout)
            sock.listen(128)
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            print(f"zptr serve: http://{shown}:{port}/ (model {name}, omega {llm.mode}, context "
                  f"{llm.n_ctx} tokens, {args.parallel} slots, queue {args.queue}"
                  f"{', API key required' if args.api_key else ''})", flush=True)
            config = uvicorn.Config(app, log_level="info" if args.verbose else "warning",
                                    access_log=args.verbose, timeout_graceful_shutdown=5,
                                    http=header_timeout_protocol(args.timeout))
            try:
                GracefulServer(config, app.state.stop_generations).run(sockets=[sock])
            except Interrupted as err:  # uvicorn raises the signal again after its graceful shutdown
                raise Interrupted(err.signum, f"stopped by {signal.Signals(err.signum).name}") from None
        finally:
            llm.close()
    finally:
        sock.close()
    return 0
