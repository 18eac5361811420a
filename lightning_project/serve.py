"""`python -m lightning_project.serve ckpt_path=P`: an HTTP API on 127.0.0.1:8000.

    curl -F file=@photo.jpg http://127.0.0.1:8000/predict
    -> {"class": "cat", "confidence": 0.93, "top": [{"class": "cat", "probability": 0.93}, ...]}

One process: FastAPI + uvicorn, with our own bounded micro-batching queue (serving/batcher.py), so
concurrent requests share forward passes and excess load gets 503 rather than a crash; limits are
checked before any image is decoded. Several checkpoints (`ckpt_paths`, `sweep_dir`) are served as
an ensemble and `tta=` applies, as in predict. The app itself is `serving.create_app` (no Hydra).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket

import hydra
from omegaconf import DictConfig

from lightning_project.errors import UserError
from lightning_project.predict import load_predictor
from lightning_project.utils import runtime
from lightning_project.utils.config import plain

try:
    import uvicorn

    from lightning_project.serving import Settings, check_settings, create_app
except ImportError as e:  # the deploy extra is not installed: one line with the fix, when serve runs
    MISSING = e
else:
    MISSING = None

log = logging.getLogger("lightning_project")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
SERVER_KEYS = ("host", "port", "log_level")  # uvicorn's; the other serve.* keys are the app's Settings


def server_settings(cfg: DictConfig) -> tuple[Settings, str, int, str]:
    """The checked `serve.` values: the app's Settings, host, port and log level (one line naming a bad key)."""
    s = cfg.serve
    host, port, level = s.host, s.port, s.log_level
    if not isinstance(host, str) or not host.strip():
        raise UserError(f"serve.host={host!r}: give an address to listen on: 127.0.0.1 (this machine only) "
                        "or 0.0.0.0 (every interface)")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise UserError(f"serve.port={port!r}: give a port number from 1 to 65535 (e.g. 8000)")
    if not isinstance(level, str) or level.lower() not in LOG_LEVELS:
        raise UserError(f"serve.log_level={level!r}: choose one of {' | '.join(LOG_LEVELS)}")
    values = {k: v for k, v in plain(s).items() if k not in SERVER_KEYS}
    if isinstance(values.get("api_key"), int) and not isinstance(values["api_key"], bool):
        values["api_key"] = str(values["api_key"])  # serve.api_key=12345 arrives as a number
    check_settings(values, "serve.")
    return Settings(**values), host.strip(), port, level.lower()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_address(host: str, port: int) -> None:
    """Bind and release the address now, as uvicorn will bind it, so a port in use or a wrong host is
    one line before the model loads, not a uvicorn log after it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except socket.gaierror as e:
            raise UserError(f"serve.host={host!r}: not a known address ({e.strerror}); use 127.0.0.1 (this machine "
                            "only) or 0.0.0.0 (every interface)") from None
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(f"serve.port={port}: {host}:{port} is in use (another server?); choose another "
                                "serve.port") from None
            if e.errno == errno.EACCES:
                raise UserError(f"serve.port={port}: not allowed to listen on it ({e.strerror}); ports below 1024 "
                                "need privileges: choose e.g. serve.port=8000") from None
            raise UserError(f"serve.host={host!r}: cannot listen there ({e.strerror}); use an address of this "
                            "machine: 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None


def serve(cfg: DictConfig) -> None:
    runtime.quiet_library_noise()
    if MISSING is not None:
        raise UserError(f"serve needs FastAPI, uvicorn and python-multipart ({MISSING}); "
                        "pip install 'lightning_project[deploy]'")
    settings, host, port, level = server_settings(cfg)  # before the model loads
    check_address(host, port)
    predictor = load_predictor(cfg)
    app = create_app(predictor, settings)

    log.setLevel(logging.getLevelName(level.upper()))  # uvicorn registers TRACE on import
    meta = predictor.metadata()
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    log.info("serving %s (%d classes, tta=%s) on %s at %s: POST /predict, GET /metadata, GET /health, docs at /docs",
             meta["model_name"], len(predictor.classes), meta["tta"], predictor.device, url)
    if settings.api_key:
        log.info("API key required on every route but /health: X-API-Key: <key> or Authorization: Bearer <key>")
    else:
        log.info("no API key required (set serve.api_key or LIGHTNING_PROJECT_API_KEY to require one)")
        if not is_loopback(host):
            log.warning("listening on %s without an API key: anyone who reaches port %d can use the model; "
                        "set LIGHTNING_PROJECT_API_KEY (or serve.api_key)", host, port)
    uvicorn.run(app, host=host, port=port, log_level=level)


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    with runtime.user_errors():
        serve(cfg)


if __name__ == "__main__":
    main()
