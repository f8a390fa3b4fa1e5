"""The Celery application: ``blaze_jobs.celery_app:app``, configured from ``celeryconfig.py``."""

from celery import Celery

app = Celery("blaze_jobs")
app.config_from_object("celeryconfig")
