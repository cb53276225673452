"""The scheduler service: validates submissions and puts them on work queues."""
