"""The etcd v3 client a run's handler uses: process-shared, and checked at once so that a bad
endpoint fails fast and clearly."""

from __future__ import annotations

from rdzv.backends.etcd_v3.errors import etcd_errors
from rdzv.etcd import EtcdClient
from rdzv.rendezvous.settings import RendezvousSettings


def connect(settings: RendezvousSettings) -> EtcdClient:
    """A (process-shared) client, checked now so a bad endpoint fails fast and clearly."""
    access = settings.access
    client = EtcdClient.shared(
        list(settings.endpoints), timeout=settings.read_timeout,
        connect_timeout=min(settings.read_timeout, 5.0), ca_cert=access.cacert, cert=access.cert,
        key=access.key, tls=access.tls, user=access.user, password=access.password,
    )
    try:
        with etcd_errors(f"etcd {','.join(settings.endpoints)}"):
            client.check()
    except BaseException:
        client.close()
        raise
    return client
