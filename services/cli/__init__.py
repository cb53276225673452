"""The `leveret` command line: service entry points, submit, status, demo, bench."""
