"""moto's S3 served over HTTPS with a throwaway CA (trustme), for the private-CA tests of the S3
source (tests/pool) and of the restore Job's download container (tests/k8s)."""

from __future__ import annotations

import contextlib
import pathlib
import ssl
import threading
from collections.abc import Iterator

import boto3
import trustme
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server

BUCKET = "tls"
KEY = "nightly/1717200000.sql.gz"
BODY = b"x"


@contextlib.contextmanager
def https_s3(ca: trustme.CA, folder: pathlib.Path) -> Iterator[str]:
    """Serve S3 at ``https://localhost:PORT`` (yielded) with a certificate for localhost from
    ``ca``, holding bucket ``BUCKET`` with one object ``KEY``; ``folder`` gets the CA's PEM."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    server = make_server(
        "127.0.0.1",
        0,
        DomainDispatcherApplication(create_backend_app),
        threaded=True,
        request_handler=MotoRequestHandler,
        ssl_context=context,
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"https://localhost:{server.server_port}"
    pem = folder / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    try:
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test-secret",
            verify=str(pem),
        )
        client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key=KEY, Body=BODY)
        yield endpoint
    finally:
        server.shutdown()
        thread.join()
