"""Layer 5, control: the server driver that runs the lifecycle, the admin API, metrics, logs,
the app check and stop, the wrapper and the ``drain`` command."""
