"""Worker processes: an engine worker per device, and (later) the webhook worker."""
