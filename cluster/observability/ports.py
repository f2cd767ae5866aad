"""Where the local stack's observability listens by default, on 127.0.0.1: Ray's dashboard,
Hyperfleet's Prometheus, and the Grafana a user may point at its provisioning. Each is Ray's or
the program's own default, so a user who knows one of them finds it where they expect."""

DASHBOARD_PORT = 8265  # Ray's own default (`ray start --dashboard-port`)
PROMETHEUS_PORT = 9090  # Prometheus's, and where Ray's dashboard looks by default
GRAFANA_PORT = 3000  # Grafana's, and where Ray's dashboard looks by default


def loopback_url(port: int) -> str:
    """``http://127.0.0.1:<port>``: every server of the local stack listens on loopback alone."""
    return f"http://127.0.0.1:{port}"
