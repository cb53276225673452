"""The worker service: runs tasks from one pool's work queue."""
