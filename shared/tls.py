"""TLS to the broker: the SSL context an ``amqps://`` connection uses."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from leveret.errors import ConfigError


@dataclass(frozen=True)
class AmqpTls:
    """The files of ``LEVERET_AMQP_CA_FILE``, ``_CERT_FILE`` and ``_KEY_FILE``."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def context(self, url: str) -> ssl.SSLContext | None:
        """A verifying client context for an ``amqps://`` `url` (None for ``amqp://``):
        the CA file's certificates, else the system's; the client certificate if set."""
        if not url.lower().startswith("amqps://"):
            return None
        try:
            context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
            if self.cert_file is not None:
                context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"broker TLS files unusable: {exc}") from exc
        return context
