"""``leveret tracker``: records every task's status and every worker's heartbeat from the
tracker queue, and serves them over HTTP (entry point: :func:`leveret.tracker.service.main`)."""
