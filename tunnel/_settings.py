"""Settings of the gateway and of the client side (one frozen tree, built by the caller)."""

from __future__ import annotations

import pathlib

import attrs

from aldaas.tunnel._relay import RelayMode


@attrs.frozen(kw_only=True)
class GatewaySettings:
    """The websocket gateway: one listening port for every session."""

    host: str = "127.0.0.1"
    """Address to listen on; loopback by default, an ingress or ``0.0.0.0`` is a choice."""
    port: int = 8765
    """TCP port to listen on; 0 picks a free one (tests)."""
    path: str = "/tunnel"
    """HTTP path of the multiplexed endpoint; other paths get 404 (or the legacy endpoint)."""
    instance_token: str = attrs.field(default="", repr=False)
    """Bearer token that opens new sessions; empty refuses every new session. Never logged."""
    tls_certificate: pathlib.Path | None = None
    """PEM certificate chain for TLS on the listener; None serves plain ws (behind an ingress)."""
    tls_private_key: pathlib.Path | None = None
    """PEM private key matching ``tls_certificate``."""
    max_sessions: int = 1000
    """Live sessions (attached or in their grace period) beyond which new ones get HTTP 503."""
    max_unauthenticated: int = 512
    """Connections still in their handshake (TLS, upgrade, credentials not yet verified) beyond
    which new ones get HTTP 503 at once; each lasts at most ``handshake_timeout``."""
    max_unauthenticated_per_peer: int = 64
    """The same, per peer address (HTTP 429): one address cannot fill the gateway with idle
    handshakes. Behind an ingress every client has the ingress's address; 64 handshakes in
    flight at once is still far above what a healthy ingress holds."""
    memory_budget: int = 2 * 1024 * 1024 * 1024
    """Bytes all sessions may hold in replay buffers and stream receive windows together.

    Each session holds 256 KiB of replay from the start and more, up to
    ``replay_buffer_size``, while the budget has room; each open stream holds
    ``stream_window``. A session or stream that does not fit is refused (HTTP 503, reset
    code 3). 2 GiB admits ``max_sessions`` (1,000) sessions with 1,800 open streams between
    them at the default window; docs/benchmarks.md shows what 1,000 sessions really use."""
    max_streams_per_session: int = 256
    """Open streams per session beyond which a new stream is reset (the others go on)."""
    max_frame_size: int = 1024 * 1024
    """Largest frame payload accepted; a bigger one closes that websocket with 1009."""
    stream_window: int = 1024 * 1024
    """Per-stream credit: bytes buffered for one slow reader at most; 1 MiB keeps loopback fast."""
    replay_buffer_size: int = 8 * 1024 * 1024
    """Unacknowledged bytes kept per session for resumption; senders wait when it is full."""
    receive_buffer_size: int = 256 * 1024
    """Bytes asked of the socket per read; 4 KiB (trio-websocket's default) costs 10x in bulk."""
    handshake_timeout: float = 10.0
    """Seconds for HTTP upgrade plus HELLO; slower peers are dropped (slowloris)."""
    grace_period: float = 30.0
    """Seconds a detached session and its streams wait for the client to resume."""
    keepalive_interval: float = 15.0
    """Seconds between PINGs on an idle websocket; below common proxy idle timeouts (60 s)."""
    keepalive_timeout: float = 45.0
    """Seconds without any frame from the peer after which the websocket is considered dead."""
    connect_timeout: float = 10.0
    """Seconds to connect a new stream to the address the session resolves to."""
    legacy_endpoint: bool = False
    """Serve ``/{name}/{secret}/{lease}`` for the original aldaas client (one websocket per TCP
    connection, raw bytes); off because the URL carries the lease's secret (see
    docs/protocol.md)."""
    traffic_report_interval: float = 1.0
    """Seconds between traffic reports per session; idle TTLs need no finer grain."""
    relay: RelayMode = "auto"
    """How ready sockets are served: ``epoll`` (the Linux accelerator: one epoll of the
    tunnel's own, fewest scheduler passes), ``portable`` (trio's own waits: macOS, Windows),
    or ``auto``: the ``ALDAAS_TUNNEL_RELAY`` variable if set, else ``epoll`` where it exists.
    Both carry the same protocol; ``portable`` is the way around a suspected relay bug."""


@attrs.frozen(kw_only=True)
class ClientSettings:
    """The client side: a local TCP listener whose connections travel as streams."""

    url: str = "ws://127.0.0.1:8765/tunnel"
    """The gateway's multiplexed endpoint (ws:// or wss://)."""
    listen_host: str = "127.0.0.1"
    """Local address applications connect to; loopback so nobody else can."""
    listen_port: int = 0
    """Local port; 0 picks a free one (the chosen one is in ``TunnelClient.local_address``)."""
    listen: bool = True
    """Whether to listen at all (False for callers that only use ``open_stream``)."""
    ca_file: pathlib.Path | None = None
    """CA bundle to verify wss:// against; None uses the system store."""
    max_frame_size: int = 1024 * 1024
    """Largest frame payload accepted from the gateway."""
    stream_window: int = 1024 * 1024
    """Per-stream credit granted to the gateway (bytes buffered per slow local reader)."""
    replay_buffer_size: int = 8 * 1024 * 1024
    """Unacknowledged bytes kept for resumption; senders wait when it is full."""
    receive_buffer_size: int = 256 * 1024
    """Bytes asked of the socket per read."""
    connect_timeout: float = 10.0
    """Seconds for TCP + TLS + websocket upgrade of one attempt."""
    keepalive_interval: float = 15.0
    """Seconds between PINGs on an idle websocket."""
    keepalive_timeout: float = 45.0
    """Seconds without any frame from the gateway before reconnecting."""
    reconnect_initial_delay: float = 0.25
    """First backoff delay after a drop; doubled per failed attempt, with full jitter."""
    reconnect_max_delay: float = 8.0
    """Backoff ceiling; stays well inside the gateway's 30 s grace period."""
    relay: RelayMode = "auto"
    """How ready sockets are served: ``epoll`` (Linux only), ``portable`` (any platform) or
    ``auto``: the ``ALDAAS_TUNNEL_RELAY`` variable if set, else ``epoll`` where it exists."""
