"""TLS settings in shotover's shape, for sources (server side) and sinks (client side).

`ssl` is imported only where TLS is configured: most proxies never load it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from .config import Problems, TlsAcceptorConfig, take_mapping


@dataclass
class TlsConnectorConfig:
    certificate_authority_path: Optional[str] = None
    certificate_path: Optional[str] = None
    private_key_path: Optional[str] = None
    verify_hostname: bool = True

    def client_context(self):
        # gevent's SSLContext makes sockets that wait cooperatively; the stdlib's would block
        # the whole hub.
        from gevent import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.certificate_authority_path:
            context.load_verify_locations(self.certificate_authority_path)
        else:
            context.load_default_certs()
        context.check_hostname = self.verify_hostname
        if not self.verify_hostname:
            # Without a name to check, the certificate chain is still verified.
            context.verify_mode = ssl.CERT_REQUIRED
        if self.certificate_path:
            context.load_cert_chain(self.certificate_path, self.private_key_path)
        return context

    def server_hostname(self, address) -> Optional[str]:
        return address[0]


def parse_tls_connector(value: Any, where: str, problems: Problems) -> Optional[TlsConnectorConfig]:
    values = take_mapping(value, where, problems, required={}, optional={
        "certificate_authority_path": (str, None), "certificate_path": (str, None),
        "private_key_path": (str, None), "verify_hostname": (bool, True)})
    if values is None:
        return None
    if bool(values["certificate_path"]) != bool(values["private_key_path"]):
        problems.add(where, "certificate_path and private_key_path go together")
    for key in ("certificate_authority_path", "certificate_path", "private_key_path"):
        if values[key] and not os.path.exists(values[key]):
            problems.add(f"{where}.{key}", f"file {values[key]!r} does not exist")
    return TlsConnectorConfig(**values)


def server_context(config: TlsAcceptorConfig):
    from gevent import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(config.certificate_path, config.private_key_path)
    if config.certificate_authority_path:
        context.load_verify_locations(config.certificate_authority_path)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
