"""Network configuration for every download kbundle makes: rattler (channels' repodata, for a
solve), kbundle's own downloader (conda packages, wheels, sdists: image/download.py) and pip.

Downloads happen on the host, where the user's proxy variables and CA trust live (an
intercepting corporate CA is trusted there and nowhere else). This module turns those into
rattler's settings and the downloader's CA rule, and gives pip the environment it reads them from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

_CA_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
_PROXY_VARIABLES = ("https_proxy", "http_proxy", "no_proxy")


def host_ca_bundle(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """A CA bundle the user pointed at with the usual variables, if it exists."""
    env = os.environ if environ is None else environ
    for var in _CA_VARIABLES:
        value = env.get(var)
        if value and Path(value).is_file():
            return value
    return None


def ca_for_requests(environ: Optional[Mapping[str, str]] = None) -> str | bool:
    """What kbundle's own downloads (wheels, sdists: image/download.py) verify TLS against: pip's
    CA bundle (PIP_CERT), else the one the usual variables name, else requests' default store.
    The same rule as the pip kbundle runs, so a corporate CA trusted for pip is trusted here."""
    env = os.environ if environ is None else environ
    cert = env.get("PIP_CERT")
    if cert and Path(cert).is_file():
        return cert
    return host_ca_bundle(env) or True


def ca_for_channels(environ: Optional[Mapping[str, str]] = None) -> str | bool:
    """What conda package downloads (image/env.py, through image/download.py) verify TLS against:
    the CA bundle the usual variables name, else the system's own store, as rattler's
    `tls-root-certs: system` did (an intercepting corporate CA is installed there), else
    requests' default store."""
    import ssl

    found = host_ca_bundle(environ)
    if found:
        return found
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and Path(candidate).is_file():
            return candidate
    return True


def proxies(environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The proxy variables, lower-cased names (curl, pip and conda read either case)."""
    env = os.environ if environ is None else environ
    return {k.lower(): v for k, v in env.items() if k.lower() in _PROXY_VARIABLES and v}


def rattler_config():
    """rattler's networking from the host: the system CA store and the proxy variables."""
    import rattler

    config = rattler.Config()
    # rustls' native roots read the OS store, and SSL_CERT_FILE when set.
    config.set("tls-root-certs", "system")
    found = proxies()
    if found.get("https_proxy"):
        config.set("proxy-config.https", found["https_proxy"])
    if found.get("http_proxy"):
        config.set("proxy-config.http", found["http_proxy"])
    if found.get("no_proxy"):
        hosts = [h.strip() for h in found["no_proxy"].split(",") if h.strip()]
        config.set("proxy-config.non-proxy-hosts", json.dumps(hosts))
    return config


def rattler_client():
    """The one rattler HTTP client every solve and install uses."""
    import rattler

    ca = host_ca_bundle()
    if ca and not os.environ.get("SSL_CERT_FILE"):
        os.environ["SSL_CERT_FILE"] = ca  # the rustls native-certs loader honours it
    return rattler.Client.from_config(rattler_config())


def pip_environment() -> dict[str, str]:
    """The environment pip runs in: the user's own, so pip.conf, proxies and CA settings apply."""
    return os.environ.copy()
