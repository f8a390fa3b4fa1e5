"""The Celery application: ``blaze_jobs.celery_app:app``, configured from ``blaze_jobs/celeryconfig.py``."""

from typing import Any

from celery import Celery
from celery.signals import celeryd_init

app = Celery("blaze_jobs")
app.config_from_object("blaze_jobs.celeryconfig")

#: The broker transport of worker processes (``blaze_jobs/transport.py`` says why).
WORKER_TRANSPORT = "blaze_jobs.transport:Transport"


@celeryd_init.connect
def _consume_through_our_transport(conf: Any, **_: Any) -> None:
    # Workers only, through Celery's hook for worker configuration: they hold messages
    # across a Redis restart. Everything else keeps kombu's own transport, because the
    # broker URL kombu reports takes the transport's name as its scheme, and Flower reads
    # that scheme to pick its queue reader (``redis`` it knows; a class path it does not).
    conf.broker_transport = WORKER_TRANSPORT
