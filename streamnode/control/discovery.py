"""mDNS (Bonjour/zeroconf) announcement of OSCQuery: `_oscjson._tcp` for the HTTP/websocket port
and `_osc._udp` for the OSC port, so clients list the node without being told where it is.

Opt-in (`osc.oscquery_mdns`), and announced only where the node listens: a node on 127.0.0.1
announces on loopback alone (nothing reaches the LAN), one on a LAN address on that interface,
one on 0.0.0.0 on every interface with each non-loopback IPv4 address. Registration runs on its
own thread (mDNS probing takes about a second); a failure is a warning, never a stopped node.
Needs `zeroconf` (`pip install 'streamnode[oscquery]'`).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from typing import Any

logger = logging.getLogger(__name__)

OSCJSON = "_oscjson._tcp.local."
OSC_UDP = "_osc._udp.local."


class Announcement:
    """Announces `name` at `host` (the address the node listens on) with its OSCQuery and OSC ports.
    `start()` returns at once; `stop(timeout)` withdraws it; both safe twice."""

    def __init__(self, name: str, host: str, oscquery_port: int, osc_port: int) -> None:
        self.name = name.replace(".", "-")  # a dot would split the instance name
        self.host = host
        self.ports = {OSCJSON: oscquery_port, OSC_UDP: osc_port}
        self._zeroconf: Any = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopped = False
        self.announced = threading.Event()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._register, name="oscquery-mdns", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        with self._lock:
            self._stopped = True
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            zc, self._zeroconf = self._zeroconf, None
        if zc is None:
            return
        try:
            zc.close()  # withdraws every service it announced ("goodbye" packets)
        except Exception as e:  # withdrawing is a courtesy; shutdown goes on
            logger.warning("OSCQuery: mDNS teardown failed: %s", e)

    def _register(self) -> None:
        try:
            from zeroconf import ServiceInfo, Zeroconf, get_all_addresses
        except ImportError:
            logger.warning("OSCQuery: mDNS announcement needs zeroconf: pip install 'streamnode[oscquery]'")
            return
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            logger.warning("OSCQuery: no mDNS announcement: %r is not an IP address", self.host)
            return
        if ip.version != 4:
            logger.warning("OSCQuery: the mDNS announcement is IPv4 only; %s is not announced", self.host)
            return
        if ip.is_unspecified:
            interfaces: Any = None  # zeroconf's default: every interface
            addresses = [a for a in get_all_addresses() if not ipaddress.ip_address(a).is_loopback]
        else:
            interfaces, addresses = [self.host], [self.host]
        if not addresses:
            logger.warning("OSCQuery: no mDNS announcement: no network address to announce")
            return
        try:
            with self._lock:
                if self._stopped:
                    return
                zc = self._zeroconf = Zeroconf(interfaces=interfaces) if interfaces is not None else Zeroconf()
            for kind, port in self.ports.items():
                if self._stopped:
                    return
                zc.register_service(ServiceInfo(kind, f"{self.name}.{kind}", port=port, properties={},
                                                addresses=[socket.inet_aton(a) for a in addresses]))
            self.announced.set()
            logger.info("OSCQuery announced over mDNS as %r on %s", self.name, ", ".join(addresses))
        except Exception as e:  # discovery is a convenience; the node works without it
            logger.warning("OSCQuery: mDNS announcement failed: %s", e)
