"""Command line: the only place that prints for humans and calls sys.exit.

Exit status: 0 success, 1 the operation failed (the daemon's error is printed),
2 bad usage or configuration, 3 the daemon could not be reached.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import IO, Any, NoReturn

from . import __version__, tls
from .config import Config, config_path_from, format_size, load_config, read_secret
from .errors import ConfigError, SwarmcacheError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
_POLL_SECONDS = 0.5


class CliError(Exception):
    """An error to print in one line, with its exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


def _add_global_options(p: argparse.ArgumentParser, default: object) -> None:
    p.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        default=default,
        help="config file (default: $SWARMCACHE_CONFIG, else "
        "/etc/swarmcache/swarmcache.toml if present, else built-in defaults)",
    )
    p.add_argument(
        "--daemon",
        metavar="URL",
        default=default,
        help="daemon API base URL for client commands "
        "(default: http://<daemon.listen> from the config; https:// with [security] tls_*)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    p = argparse.ArgumentParser(
        prog="swarmcache",
        description="Peer-to-peer VM image cache. 'serve' runs the daemon; the other "
        "commands talk to a running daemon's HTTP API.",
        epilog="Exit status: 0 ok, 1 operation failed, 2 bad usage or config, "
        "3 daemon unreachable.",
    )
    p.add_argument("--version", action="version", version=f"swarmcache {__version__}")
    _add_global_options(p, None)
    # The same options after the command (`swarmcache serve --config FILE`). SUPPRESS: a
    # command that is not given one leaves the value from before the command alone.
    common = argparse.ArgumentParser(add_help=False)
    _add_global_options(common, argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub_parser = functools.partial(sub.add_parser, parents=[common])

    sub_parser(
        "serve",
        help="run the daemon in the foreground",
        description="Run the daemon: HTTP API on daemon.listen, cache in cache.dir.",
    )
    f = sub_parser(
        "fetch",
        help="fetch an image into the cache (or into a file with -o)",
        description="Fetch an image through the daemon. Without -o, the daemon "
        "fetches it into its cache and the command waits until it is complete "
        "and verified. With -o, the image bytes are also written to FILE "
        "(FILE.part until the download completed). A progress bar with rate "
        "and ETA is shown on a terminal.",
    )
    f.add_argument("image_id", metavar="ID")
    f.add_argument("-o", "--output", metavar="FILE", help="write the image to FILE ('-' = stdout)")
    f.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ls = sub_parser("ls", help="list cached images", description="List cached images.")
    ls.add_argument("--json", action="store_true", help="print the API's JSON")
    st = sub_parser(
        "status",
        help="show one image's state and fetch progress",
        description="Show one image's state, chunks and fetch progress.",
    )
    st.add_argument("image_id", metavar="ID")
    st.add_argument("--json", action="store_true", help="print the API's JSON")
    ev = sub_parser(
        "evict",
        help="remove an image from the cache",
        description="Remove an image from the cache (fails while it is read).",
    )
    ev.add_argument("image_id", metavar="ID")
    pin = sub_parser(
        "pin",
        help="keep an image in the cache (never evicted)",
        description="Pin a cached image so eviction never removes it.",
    )
    pin.add_argument("image_id", metavar="ID")
    unpin = sub_parser(
        "unpin", help="let eviction remove an image again", description="Unpin an image."
    )
    unpin.add_argument("image_id", metavar="ID")
    peers = sub_parser(
        "peers",
        help="show the peer table",
        description="Show the other daemons this one knows: node id, address, state "
        "(ok, down, quarantined, gone), last seen, images and chunks they hold, "
        "measured transfer rate.",
    )
    peers.add_argument("--json", action="store_true", help="print the API's JSON")
    vf = sub_parser(
        "verify",
        help="re-hash cached images on disk; drop chunks that fail",
        description="Read every chunk of the image (or of every cached image) back from "
        "disk and compare it with its digest. A chunk that fails is dropped, so it is "
        "fetched again on the next read and never served; the image is partial until "
        "then. Exit status 1 if any chunk failed.",
    )
    vf.add_argument("image_id", metavar="ID", nargs="?", help="one image (default: all)")
    vf.add_argument("--json", action="store_true", help="print the API's JSON")
    sd = sub_parser(
        "seed",
        help="on a seeder: feed images into the swarm ahead of demand, signed",
        description='On the daemon.role = "seeder" host: fetch each image from the '
        "origin (or, with --file, take a local copy of one, kept only if it matches the "
        "size and checksum the origin publishes for --image-id), and sign its manifest. "
        "Waits until each is complete and signed; exit status 1 if any failed.",
    )
    sd.add_argument("image_ids", metavar="ID", nargs="*", help="image ids")
    sd.add_argument("--file", metavar="PATH", help="a local copy of the image to send")
    sd.add_argument("--image-id", metavar="ID", help="the image --file is a copy of")
    kg = sub_parser(
        "keygen",
        help="make a seeder's manifest signing key (or show a key's public half)",
        description="Write a new Ed25519 private key to FILE (mode 0600; an existing "
        "file is never overwritten) for a seeder's security.manifest_key_file, and "
        "print its public key for the hosts' security.trusted_manifest_keys. With "
        "--public, print the public key of the key in FILE.",
    )
    kg.add_argument("key_file", metavar="FILE")
    kg.add_argument("--public", action="store_true", help="only print FILE's public key")
    w = sub_parser(
        "warm",
        help="pre-warm images on this host, a list of hosts, or every host",
        description="Fetch images into caches ahead of a rollout. The daemon this "
        "command talks to runs the job: every host starts on an image at once, so the "
        "origin sends it about once however many hosts warm it. Without --wait the "
        "job id is printed (follow it with GET /v1/warm/JOB); with --wait a live "
        "per-host view is drawn and the exit status is 1 if anything failed.",
    )
    w.add_argument("image_ids", metavar="ID", nargs="*", help="image ids")
    w.add_argument(
        "--from-file",
        metavar="FILE",
        help="more image ids, one per line ('-' = stdin; blank lines and # comments skipped)",
    )
    w.add_argument(
        "--hosts",
        metavar="all|HOST:PORT,...",
        help="'all' (this host and every peer it knows) or a comma-separated list of "
        "daemon API addresses (default: this host only)",
    )
    w.add_argument("--wait", action="store_true", help="follow the job until it ends")
    w.add_argument(
        "--json", action="store_true", help="print the API's JSON (with --wait: at the end)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the `swarmcache` command."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "keygen":  # needs no config and no daemon
            sys.exit(cmd_keygen(args))
        config = load_config(config_path_from(args.config))
        if args.command == "serve":
            from .daemon import run

            run(config)
            sys.exit(EXIT_OK)
        url = _daemon_url(args.daemon, config.daemon.listen, bool(config.security.tls_cert))
        context = tls.client_context(config.security) if url.startswith("https:") else None
        client = Client(url, _api_token(config), context)
        # SIGTERM like Ctrl-C: a download in progress removes its FILE.part
        signal.signal(signal.SIGTERM, _interrupt)
        sys.exit(COMMANDS[args.command](client, args))
    except ConfigError as err:
        print(f"swarmcache: config error: {err.detail}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except CliError as err:
        print(f"swarmcache: {err}", file=sys.stderr)
        sys.exit(err.status)
    except SwarmcacheError as err:
        print(f"swarmcache: {err.error}: {err.detail}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    except BrokenPipeError:  # before OSError, which it is
        # The reader of our stdout left (`ls | head`): no message, nothing more to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_FAILED if args.command == "fetch" else EXIT_OK)
    except OSError as err:
        print(f"swarmcache: {err}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    except KeyboardInterrupt:
        sys.exit(130)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _daemon_url(arg: str | None, listen: str, tls_set: bool = False) -> str:
    """The daemon's base URL: --daemon, else http(s)://<daemon.listen> (https with
    mutual TLS); CliError if malformed."""
    if not arg:
        # a daemon listening on every address is reached on loopback
        host, _, port = listen.rpartition(":")
        host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "::": "[::1]"}.get(host, host)
        arg = f"{'https' if tls_set else 'http'}://{host}:{port}"
    url = arg
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as err:
        raise CliError(f"--daemon {url!r} is not a URL: {err}", EXIT_USAGE) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CliError(
            f"--daemon {url!r} is not an http:// URL (e.g. http://127.0.0.1:7480)", EXIT_USAGE
        )
    return url


def _api_token(config: Config) -> str:
    """The config's API token, when its file is set and readable here: sent to the
    daemon, which needs it from callers on other hosts (--daemon)."""
    path = config.security.api_token_file
    if not path:
        return ""
    try:
        return read_secret(path, "security.api_token_file")
    except ConfigError:
        return ""  # not readable by this user: talk to the local daemon without it


class Client:
    """A small blocking client for the daemon's API."""

    def __init__(self, base: str, token: str = "", context: ssl.SSLContext | None = None) -> None:
        self.base = base.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.context = context  # https: the daemon's certificate checked against tls_ca

    def open(self, method: str, path: str, body: Any = None) -> Any:
        """Send a request (`body` as JSON); raise CliError with the daemon's message on
        an error status."""
        data = None if body is None else json.dumps(body).encode()
        headers = dict(self.headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        try:
            return urllib.request.urlopen(req, timeout=60, context=self.context)
        except urllib.error.HTTPError as err:
            raise CliError(_error_text(err)) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            reason = getattr(err, "reason", err)
            raise CliError(
                f"cannot reach the daemon at {self.base}: {reason}", EXIT_UNREACHABLE
            ) from None

    def json(self, method: str, path: str, body: Any = None) -> Any:
        """Send a request and decode the JSON answer."""
        with self.open(method, path, body) as resp:
            return json.load(resp)


def _error_text(err: urllib.error.HTTPError) -> str:
    try:
        body = json.load(err)
        return f"{body['error']}: {body['detail']} (HTTP {err.code})"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {err.code} {err.reason}"


def _path(image_id: str, suffix: str = "") -> str:
    return "/v1/images/" + urllib.parse.quote(image_id, safe="") + suffix


class Progress:
    """A one-line progress bar with rate and ETA, drawn only on a terminal."""

    def __init__(self, label: str, stream: IO[str], enabled: bool) -> None:
        self.label = label
        self.stream = stream
        self.enabled = enabled and stream.isatty()
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, done: int, total: int | None, *, force: bool = False) -> None:
        """Redraw (at most 10 times a second)."""
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < 0.1):
            return
        self._last = now
        rate = done / max(now - self.start, 1e-6)
        parts = [self.label]
        if total:
            parts.append(f"{100 * done / total:5.1f}%")
            parts.append(f"{format_size(done)}/{format_size(total)}")
        else:
            parts.append(format_size(done))
        parts.append(f"{format_size(int(rate))}/s")
        if total and rate > 0 and done < total:
            parts.append(f"ETA {int((total - done) / rate)}s")
        self.stream.write("\r" + "  ".join(parts) + "\x1b[K")
        self.stream.flush()

    def finish(self) -> None:
        """End the line."""
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def cmd_fetch(client: Client, args: argparse.Namespace) -> int:
    """swarmcache fetch ID [-o FILE]."""
    progress = Progress(args.image_id, sys.stderr, not args.quiet)
    if args.output:
        _download(client, args.image_id, args.output, progress)
    else:
        _wait_cached(client, args.image_id, progress)
    progress.finish()
    return EXIT_OK


def _download(client: Client, image_id: str, output: str, progress: Progress) -> None:
    to_stdout = output == "-"
    part = output + ".part"
    with client.open("GET", _path(image_id)) as resp:
        total = int(resp.headers.get("Content-Length", 0)) or None
        out: IO[bytes] = sys.stdout.buffer if to_stdout else open(part, "wb")  # noqa: SIM115
        done = 0
        try:
            while True:
                block = resp.read(1 << 20)
                if not block:
                    break
                out.write(block)
                done += len(block)
                progress.update(done, total)
            progress.update(done, total, force=True)
            if total is not None and done != total:
                raise CliError(
                    f"download of {image_id} cut short at {done} of {total} bytes "
                    "(the daemon aborted it; see its log)"
                )
            out.flush()
            if not to_stdout:
                os.fsync(out.fileno())
        except BaseException:
            if not to_stdout:
                out.close()
                os.unlink(part)
            raise
    if not to_stdout:
        out.close()
        os.replace(part, output)


def _wait_cached(client: Client, image_id: str, progress: Progress) -> None:
    status = client.json("POST", _path(image_id, "/fetch"))
    while status["state"] != "complete":
        if status["state"] == "failed":
            err = status.get("error", {})
            raise CliError(f"fetch of {image_id} failed: {err.get('error')}: {err.get('detail')}")
        if status["state"] == "partial":  # a fetch that ended; ask once more
            status = client.json("POST", _path(image_id, "/fetch"))
            continue
        progress.update(status.get("bytes", 0), status.get("size"))
        # the daemon answers as soon as the fetch ends, else after _POLL_SECONDS (an
        # older daemon ignores wait: then the sleep keeps the pace)
        asked = time.monotonic()
        status = client.json("GET", _path(image_id, f"/status?wait={_POLL_SECONDS}"))
        if status["state"] not in ("complete", "failed"):
            time.sleep(max(0.0, _POLL_SECONDS - (time.monotonic() - asked)))
    progress.update(status["size"], status["size"], force=True)


def cmd_ls(client: Client, args: argparse.Namespace) -> int:
    """swarmcache ls."""
    data = client.json("GET", "/v1/images")
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    rows = [("ID", "STATE", "SIZE", "CHUNKS", "HITS", "PINNED", "LAST ACCESS")]
    for img in data["images"]:
        last = img.get("last_access")
        rows.append(
            (
                img["id"],
                img["state"],
                format_size(img["size"]) if img.get("size") is not None else "-",
                f"{img.get('chunks_present', 0)}/{img.get('chunks_total', '-')}",
                str(img.get("hits", 0)),
                "yes" if img.get("pinned") else "no",
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last)) if last else "-",
            )
        )
    _table(rows)
    return EXIT_OK


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    """swarmcache status ID."""
    data = client.json("GET", _path(args.image_id, "/status"))
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    for key in (
        "id",
        "state",
        "size",
        "chunk_size",
        "chunks_present",
        "chunks_total",
        "bytes",
        "hits",
        "last_access",
        "pinned",
        "readers",
        "hash",
        "origin_hash",
    ):
        if key in data:
            print(f"{key:15} {_show(key, data[key])}")
    if "fetch" in data:
        for key, value in data["fetch"].items():
            print(f"{'fetch.' + key:15} {value}")
    if "error" in data:
        print(f"{'error':15} {data['error']['error']}: {data['error']['detail']}")
    return EXIT_FAILED if data["state"] == "failed" else EXIT_OK


def _show(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key == "last_access":
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    return str(value)


def cmd_evict(client: Client, args: argparse.Namespace) -> int:
    """swarmcache evict ID."""
    client.json("DELETE", _path(args.image_id))
    print(f"{args.image_id} removed")
    return EXIT_OK


def cmd_pin(client: Client, args: argparse.Namespace) -> int:
    """swarmcache pin ID / unpin ID."""
    method = "PUT" if args.command == "pin" else "DELETE"
    client.json(method, _path(args.image_id, "/pin"))
    print(f"{args.image_id} {'pinned' if method == 'PUT' else 'unpinned'}")
    return EXIT_OK


def cmd_peers(client: Client, args: argparse.Namespace) -> int:
    """swarmcache peers."""
    data = client.json("GET", "/v1/peers")
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    print(f"this daemon: {data['node_id']} at {data['address']}")
    rows = [("NODE", "ADDRESS", "STATE", "SOURCE", "LAST SEEN", "IMAGES", "CHUNKS", "RATE")]
    for p in data["peers"]:
        rate = p["rate_bytes_per_s"]
        rows.append(
            (
                p["node_id"],
                p["address"],
                p["state"],
                p["source"],
                f"{p['last_seen_s']:.0f}s ago",
                str(p["images"]),
                str(p["chunks"]),
                f"{format_size(rate)}/s" if rate else "-",
            )
        )
    _table(rows)
    return EXIT_OK


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def cmd_verify(client: Client, args: argparse.Namespace) -> int:
    """swarmcache verify [ID]."""
    if args.image_id:
        ids = [args.image_id]
    else:
        listed = client.json("GET", "/v1/images")["images"]
        ids = [i["id"] for i in listed if i["bytes"]]
    results, failed = [], False
    for image_id in ids:
        try:
            data = client.json("POST", _path(image_id, "/verify"))
        except CliError as err:
            if args.image_id or err.status == EXIT_UNREACHABLE:
                raise
            print(f"{image_id}: skipped: {err}")  # being fetched, or gone meanwhile
            continue
        results.append(data)
        bad = data["verify"]["bad_chunks"]
        failed = failed or bool(bad)
        if not args.json:
            checked = data["verify"]["chunks_checked"]
            if bad:
                shown = ", ".join(map(str, bad[:20])) + (" ..." if len(bad) > 20 else "")
                print(f"{image_id}: {len(bad)} of {checked} chunks BAD, dropped (chunks {shown})")
            else:
                print(f"{image_id}: {checked} chunks ok")
    if args.json:
        print(json.dumps(results, indent=2))
    return EXIT_FAILED if failed else EXIT_OK


def _warm_ids(args: argparse.Namespace) -> list[str]:
    ids = list(args.image_ids)
    if args.from_file:
        try:
            if args.from_file == "-":
                text = sys.stdin.read()
            else:
                with open(args.from_file, encoding="utf-8") as f:
                    text = f.read()
        except OSError as err:
            raise CliError(f"cannot read {args.from_file}: {err.strerror}", EXIT_USAGE) from None
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                ids.append(line)
    if not ids:
        raise CliError("no image ids (give IDs or --from-file FILE)", EXIT_USAGE)
    return ids


def cmd_seed(client: Client, args: argparse.Namespace) -> int:
    """swarmcache seed ID... | --file PATH --image-id ID."""
    if args.file or args.image_id:
        if not (args.file and args.image_id) or args.image_ids:
            raise CliError("--file PATH and --image-id ID go together, without other ids", 2)
        return _seed_file(client, args.file, args.image_id)
    if not args.image_ids:
        raise CliError("name the images to seed (or --file PATH --image-id ID)", EXIT_USAGE)
    failed = 0
    for image_id in args.image_ids:
        try:
            while True:
                with client.open("POST", _path(image_id, "/seed?wait=30")) as resp:
                    info = json.load(resp)
                    if resp.status == 200:
                        break
                fetch = info.get("fetch") or {}
                print(
                    f"{image_id}: fetching, {format_size(fetch.get('bytes_done', 0))}",
                    file=sys.stderr,
                )
        except CliError as err:
            if err.status == EXIT_UNREACHABLE:
                raise
            print(f"{image_id}: FAILED: {err}")
            failed += 1
            continue
        print(_seeded(info))
    return EXIT_FAILED if failed else EXIT_OK


def _seed_file(client: Client, path: str, image_id: str) -> int:
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, after the upload
    except OSError as err:
        raise CliError(f"cannot read {path}: {err.strerror}", EXIT_USAGE) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        req = urllib.request.Request(
            client.base + _path(image_id, "/seed"),
            data=f,
            headers={
                **client.headers,
                "Content-Length": str(size),
                "Content-Type": "application/octet-stream",
            },
            method="PUT",
        )
        try:
            with urllib.request.urlopen(req, timeout=600, context=client.context) as resp:
                info = json.load(resp)
        except urllib.error.HTTPError as err:
            raise CliError(_error_text(err)) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            reason = getattr(err, "reason", err)
            raise CliError(f"cannot send {path} to {client.base}: {reason}") from None
    print(_seeded(info))
    return EXIT_OK


def _seeded(info: dict[str, Any]) -> str:
    return (
        f"{info['id']}: seeded, {format_size(info['size'])}, {info['hash']}, "
        f"signed by key {info['signed_by']}"
    )


def cmd_keygen(args: argparse.Namespace) -> int:
    """swarmcache keygen FILE [--public]."""
    from .config import read_secret
    from .signing import decode_key, encode_key, key_id, new_private_key, public_key

    if args.public:
        text = read_secret(args.key_file, "key", 44)  # ConfigError: exit 2, names the file
        try:
            private = decode_key(text)
        except ValueError as err:
            raise CliError(f"{args.key_file}: {err}", EXIT_USAGE) from None
    else:
        private = new_private_key()
        try:
            fd = os.open(args.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise CliError(f"{args.key_file} exists: not overwritten") from None
        with os.fdopen(fd, "w") as f:
            f.write(encode_key(private) + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(f"wrote {args.key_file}", file=sys.stderr)
    public = public_key(private)
    print(encode_key(public))
    print(f"key id {key_id(public)}", file=sys.stderr)
    return EXIT_OK


def cmd_warm(client: Client, args: argparse.Namespace) -> int:
    """swarmcache warm."""
    body: dict[str, Any] = {"images": _warm_ids(args)}
    if args.hosts:
        hosts = args.hosts.strip()
        body["hosts"] = "all" if hosts == "all" else [h.strip() for h in hosts.split(",") if h]
    job = client.json("POST", "/v1/warm", body)
    if not args.wait:
        if args.json:
            print(json.dumps(job, indent=2))
        else:
            print(job["job"])
        return EXIT_OK
    from .warm_view import follow

    job = follow(client.json, job, quiet=args.json)
    if args.json:
        print(json.dumps(job, indent=2))
    return EXIT_FAILED if job["state"] == "failed" else EXIT_OK


COMMANDS = {
    "fetch": cmd_fetch,
    "ls": cmd_ls,
    "status": cmd_status,
    "evict": cmd_evict,
    "pin": cmd_pin,
    "unpin": cmd_pin,
    "peers": cmd_peers,
    "warm": cmd_warm,
    "seed": cmd_seed,
    "verify": cmd_verify,
}
