"""``spec-sidecar``: run the sidecar next to a vLLM server.

    spec-sidecar --policy runs/policy.json                     # 127.0.0.1:8731
    spec-sidecar --policy runs/policy.json --uds /run/spec.sock
    SPEC_SIDECAR_TOKEN=... spec-sidecar --policy p.json --host 0.0.0.0

Options override the ``SPEC_SIDECAR_*`` environment variables
(:class:`controller.sidecar.settings.SidecarSettings`).  One worker process: the engines'
feature states live in its memory.  BLAS runs one thread (set in :func:`main` before numpy
loads): a decision is a small matrix product, and on a busy 2-core host OpenBLAS worker
threads made it 30x slower (~6 ms instead of ~0.2 ms).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pydantic import ValidationError

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spec-sidecar", description="Speculation controller sidecar for vLLM")
    p.add_argument("--policy", help="policy artifact (spec-policy/1 JSON); env SPEC_SIDECAR_POLICY")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 8731)")
    p.add_argument("--uds", help="serve on a Unix socket instead of TCP")
    p.add_argument("--token-file", help="file holding the bearer token for PUT /v1/policy")
    p.add_argument("--no-watch", action="store_true", help="do not reload the policy file when it changes")
    p.add_argument("--record-dir", help="record received steps as rotating spec-trace/1 files here")
    p.add_argument("--record-max-steps", type=int, help="rotate recording files after this many steps")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    return p


def main(argv: list[str] | None = None) -> int:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")  # before numpy is imported (below); no effect if it already is
    args = build_parser().parse_args(argv)
    from controller.sidecar.settings import SidecarSettings

    over = {k: v for k, v in {"policy": args.policy, "host": args.host, "port": args.port, "uds": args.uds,
                              "record_dir": args.record_dir, "record_max_steps": args.record_max_steps,
                              "log_level": args.log_level}.items() if v is not None}
    if args.no_watch:
        over["watch"] = False
    if args.token_file:
        try:
            with open(args.token_file) as fh:
                over["token"] = fh.read().strip()
        except OSError as exc:
            print(f"spec-sidecar: cannot read --token-file: {exc}", file=sys.stderr)
            return 2
    try:
        settings = SidecarSettings(**over)
    except ValidationError as exc:
        print(f"spec-sidecar: bad settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from controller.artifact import ArtifactError
    from controller.sidecar.app import create_app

    try:
        app = create_app(settings)
    except (ArtifactError, FileNotFoundError) as exc:
        print(f"spec-sidecar: cannot serve the policy: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=settings.host, port=settings.port, uds=str(settings.uds) if settings.uds else None,
                log_level=settings.log_level, access_log=False, workers=1, timeout_graceful_shutdown=5,
                proxy_headers=False, timeout_keep_alive=75)
    return 0


if __name__ == "__main__":
    sys.exit(main())
